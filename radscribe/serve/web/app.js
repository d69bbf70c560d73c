// The radscribe web page: upload -> server-side preview (DICOM windowed by the same loader as the model) ->
// a streamed report from /v1/chat/completions -> follow-up questions about the same image.
//
// One conversation belongs to one image as shown (file + window): a new upload, a refused one or another window
// ends it (the transcript, the preview and any answer still streaming), so a follow-up can never go out with an
// image other than the one on screen. `state.epoch` counts those resets; late replies of an older epoch are dropped.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { dataUri: null, fileName: null, messages: [], model: null, busy: false, epoch: 0, abort: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

function mediaType(file, bytes) {
  // Browsers leave file.type empty for .dcm; DICOM Part 10 files carry "DICM" at byte 128.
  const isDicom = bytes.length > 132 && String.fromCharCode(...bytes.slice(128, 132)) === "DICM";
  if (isDicom) return "application/dicom";
  if (file.type) return file.type;
  return /\.(dcm|dicom)$/i.test(file.name) ? "application/dicom" : "application/octet-stream";
}

function toBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

async function errorText(resp) {
  try { return (await resp.json()).error.message; } catch (e) { return "HTTP " + resp.status; }
}

async function loadModelId() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (resp.ok) state.model = (await resp.json()).data[0].id;
}

// The page sends no sampling fields: the server answers with the model's generation_config.json defaults,
// which it reports on /health and the settings show.
async function showSamplingDefaults() {
  const resp = await fetch("/health");
  const d = resp.ok ? (await resp.json()).sampling_defaults : null;
  if (!d) return;
  const how = d.temperature === 0 ? "greedy" :
    `temperature ${d.temperature}, top_p ${d.top_p}, top_k ${d.top_k || "off"}`;
  $("sampling").textContent = `Sampling: ${how} (the model's generation_config.json)`;
}
showSamplingDefaults();

function resetConversation() {
  state.epoch += 1;
  if (state.abort) state.abort.abort();  // an answer about the previous image must not land in the new chat
  state.abort = null;
  state.messages = [];
  $("conversation").replaceChildren();
  $("followup").value = "";
  for (const id of ["send", "followup"]) $(id).disabled = true;
}

function clearPreview(caption) {
  const img = $("preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
  img.hidden = true;
  $("preview-caption").textContent = caption;
}

async function showPreview() {
  resetConversation();
  if (!state.dataUri) return;
  const epoch = state.epoch;
  $("generate").disabled = true;
  setStatus("Preparing the image…");
  const resp = await fetch("/v1/preview", { method: "POST", headers: headers(),
    body: JSON.stringify({ image_url: state.dataUri, window: $("window").value }) });
  if (epoch !== state.epoch) return;  // another upload or window came in meanwhile
  if (!resp.ok) {
    const reason = await errorText(resp);
    if (epoch !== state.epoch) return;
    state.dataUri = null;  // nothing may be sent about an image the server refused
    clearPreview(`${state.fileName} was refused.`);
    setStatus("Image refused: " + reason);
    return;
  }
  const blob = await resp.blob();
  if (epoch !== state.epoch) return;
  const img = $("preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  img.hidden = false;
  await img.decode().catch(() => {});
  if (epoch !== state.epoch) return;
  const tokens = resp.headers.get("X-Image-Tokens");
  $("preview-caption").textContent = `${state.fileName} — ${img.naturalWidth}×${img.naturalHeight} as the model sees it` +
    (tokens ? ` (${tokens} image tokens)` : "");
  $("generate").disabled = state.busy;
  setStatus("");
}

$("file").addEventListener("change", async () => {
  const file = $("file").files[0];
  if (!file) return;
  state.dataUri = null;
  state.fileName = file.name;
  resetConversation();
  clearPreview(`Reading ${file.name}…`);
  $("generate").disabled = true;
  const bytes = new Uint8Array(await file.arrayBuffer());
  state.dataUri = `data:${mediaType(file, bytes)};base64,${toBase64(bytes)}`;
  await showPreview();
});

$("window").addEventListener("change", showPreview);

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  div.textContent = text;
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function streamReply() {
  const epoch = state.epoch;
  const abort = new AbortController();
  state.abort = abort;
  state.busy = true;
  for (const id of ["generate", "send", "followup"]) $(id).disabled = true;
  const bubble = addTurn("assistant", "");
  bubble.classList.add("streaming");
  setStatus("Generating…");
  let text = "";
  const current = () => epoch === state.epoch;
  try {
    if (!state.model) await loadModelId();
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), signal: abort.signal,
      body: JSON.stringify({ model: state.model, messages: state.messages, stream: true,
                             max_tokens: parseInt($("max-tokens").value, 10) || 256 }) });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices[0].delta.content;
        if (delta) { text += delta; bubble.textContent = text; }
      }
    }
    if (current()) {
      state.messages.push({ role: "assistant", content: text });
      setStatus("Done.");
    }
  } catch (err) {
    if (current()) {
      bubble.classList.add("error");
      bubble.textContent = text + "\n[error: " + err.message + "]";
      state.messages.pop();  // drop the question that failed so a retry starts clean
      setStatus("Failed.");
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.classList.add("done");
    if (state.abort === abort) state.abort = null;
    if (current()) {
      state.busy = false;
      $("generate").disabled = !state.dataUri;
      $("send").disabled = state.messages.length === 0;
      $("followup").disabled = state.messages.length === 0;
    } else {
      state.busy = false;
      $("generate").disabled = !state.dataUri || !$("preview").src;
    }
  }
}

$("upload-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!state.dataUri || state.busy) return;
  resetConversation();  // a new report starts a new conversation about the image shown
  const prompt = $("prompt").value.trim() || "图片中的诊断结果是怎样?";
  state.messages = [{ role: "user", content: [
    { type: "image_url", image_url: { url: state.dataUri, window: $("window").value } },
    { type: "text", text: prompt },
  ] }];
  addTurn("user", prompt);
  await streamReply();
});

$("followup-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const question = $("followup").value.trim();
  if (!question || state.busy || state.messages.length === 0) return;
  $("followup").value = "";
  state.messages.push({ role: "user", content: question });
  addTurn("user", question);
  await streamReply();
});

loadModelId().catch(() => {});
