// The radscribe web page: upload -> server-side preview (DICOM windowed by the same loader as the model) ->
// a streamed report from /v1/chat/completions -> follow-up questions about the same image.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { dataUri: null, messages: [], model: null, busy: false };

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

async function showPreview() {
  if (!state.dataUri) return;
  setStatus("Preparing the image…");
  const resp = await fetch("/v1/preview", { method: "POST", headers: headers(),
    body: JSON.stringify({ image_url: state.dataUri, window: $("window").value }) });
  if (!resp.ok) { setStatus("Image refused: " + await errorText(resp)); $("generate").disabled = true; return; }
  const img = $("preview");
  img.src = URL.createObjectURL(await resp.blob());
  img.hidden = false;
  await img.decode().catch(() => {});
  $("preview-caption").textContent = `${state.fileName} — ${img.naturalWidth}×${img.naturalHeight} as the model sees it`;
  $("generate").disabled = state.busy;
  setStatus("");
}

$("file").addEventListener("change", async () => {
  const file = $("file").files[0];
  if (!file) return;
  const bytes = new Uint8Array(await file.arrayBuffer());
  state.dataUri = `data:${mediaType(file, bytes)};base64,${toBase64(bytes)}`;
  state.fileName = file.name;
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
  state.busy = true;
  for (const id of ["generate", "send", "followup"]) $(id).disabled = true;
  const bubble = addTurn("assistant", "");
  bubble.classList.add("streaming");
  setStatus("Generating…");
  let text = "";
  try {
    if (!state.model) await loadModelId();
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
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
    state.messages.push({ role: "assistant", content: text });
    setStatus("Done.");
  } catch (err) {
    bubble.classList.add("error");
    bubble.textContent = text + "\n[error: " + err.message + "]";
    state.messages.pop();  // drop the question that failed so a retry starts clean
    setStatus("Failed.");
  } finally {
    bubble.classList.remove("streaming");
    bubble.classList.add("done");
    state.busy = false;
    $("generate").disabled = !state.dataUri;
    $("send").disabled = state.messages.length === 0;
    $("followup").disabled = state.messages.length === 0;
  }
}

$("upload-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!state.dataUri || state.busy) return;
  $("conversation").replaceChildren();
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
