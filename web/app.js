// MiniVault playground: streams answers with fetch + ReadableStream, no libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // chat mode: the conversation so far
let controller = null; // the request in flight, for Stop
let queueTimer = null;
let modelName = ""; // from /health; Ollama's /api/chat needs it

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  div.textContent = text;
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function loadModel() {
  try {
    const health = await (await fetch("/health")).json();
    modelName = health.model || modelName;
    $("model").textContent = health.model ? `${health.model} · ${health.status}` : health.status;
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

// While waiting for the first token, show the server's queue.
function watchQueue() {
  queueTimer = setInterval(async () => {
    try {
      const h = await (await fetch("/health")).json();
      $("status").textContent = h.status === "loading"
        ? `model loading… ${h.queued} waiting`
        : `waiting: ${h.queued} queued, ${h.active ?? 0} generating`;
    } catch (e) { /* the answer's own request reports real errors */ }
  }, 500);
}

function stopWatchingQueue() {
  clearInterval(queueTimer);
  queueTimer = null;
}

async function errorText(resp) {
  let message = resp.statusText;
  try {
    const body = await resp.json();
    message = (body.error && (body.error.message || body.error)) || message;
  } catch (e) { /* not JSON */ }
  const hints = { 429: "too many requests", 503: "server busy", 400: "bad request", 401: "API key needed" };
  const retry = resp.headers.get("Retry-After");
  return `Error ${resp.status}${hints[resp.status] ? ` (${hints[resp.status]})` : ""}: ${message}` +
    (retry ? ` — retry in ${retry} s` : "");
}

async function send() {
  const prompt = $("prompt").value;
  if (!prompt.trim() || controller) return;
  showError("");
  const chat = $("chat-mode").checked;
  if (!chat) { $("conversation").textContent = ""; history.length = 0; }
  addTurn("user", prompt);
  const answer = addTurn("assistant", "");
  $("prompt").value = "";
  const options = {
    temperature: Number($("temperature").value),
    num_predict: Number($("max-tokens").value),
  };
  const url = chat ? "/api/chat" : "/generate";
  if (chat) history.push({ role: "user", content: prompt });
  if (chat && !modelName) await loadModel();
  const body = chat ? { model: modelName, messages: history, options } : { prompt, options };

  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  $("stats").textContent = "";
  const started = performance.now();
  let firstAt = null;
  let text = "";
  let final = null;
  watchQueue();
  try {
    const resp = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        if (!line.trim()) continue;
        const obj = JSON.parse(line);
        if (obj.error) throw new Error(`Error: ${obj.error}`);
        const piece = chat ? (obj.message && obj.message.content) || "" : obj.response || "";
        if (piece && firstAt === null) {
          firstAt = performance.now();
          stopWatchingQueue();
          $("status").textContent = "generating…";
        }
        text += piece;
        answer.textContent = text;
        if (obj.done) final = obj;
      }
    }
    if (chat) history.push({ role: "assistant", content: text });
    if (final) {
      const seconds = final.eval_duration / 1e9;
      const rate = seconds > 0 ? final.eval_count / seconds : 0;
      const ttft = firstAt === null ? "–" : `${((firstAt - started) / 1000).toFixed(2)} s`;
      $("stats").textContent =
        `first token ${ttft} · ${final.eval_count} tokens · ${rate.toFixed(1)} tokens/s · ${final.done_reason}`;
    }
    $("status").textContent = "";
  } catch (e) {
    if (e.name === "AbortError") {
      answer.classList.add("stopped");
      $("status").textContent = "stopped";
      if (chat && text) history.push({ role: "assistant", content: text });
    } else {
      if (chat) history.pop();
      if (!text) answer.remove();
      showError(e.message.startsWith("Error") ? e.message : `Cannot reach the server: ${e.message}`);
      $("status").textContent = "";
    }
  } finally {
    stopWatchingQueue();
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

// Embeddings: each line of the prompt box, ranked by cosine similarity to the first
// (the vectors come L2-normalised, so a dot product is the cosine).
async function compareLines() {
  const lines = $("prompt").value.split("\n").map((l) => l.trim()).filter(Boolean);
  showError("");
  if (lines.length < 2) { showError("Write two or more lines to compare."); return; }
  if (!modelName) await loadModel();
  try {
    const resp = await fetch("/api/embed", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: modelName, input: lines }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const vectors = (await resp.json()).embeddings;
    const dot = (a, b) => a.reduce((sum, x, i) => sum + x * b[i], 0);
    const ranked = lines.slice(1).map((line, i) => [dot(vectors[0], vectors[i + 1]), line])
      .sort((a, b) => b[0] - a[0]);
    $("conversation").textContent = "";
    addTurn("user", `Similarity to: ${lines[0]}`);
    addTurn("assistant", ranked.map(([score, line]) => `${score.toFixed(3)}  ${line}`).join("\n"));
  } catch (e) {
    showError(e.message.startsWith("Error") ? e.message : `Cannot reach the server: ${e.message}`);
  }
}

$("compare").addEventListener("click", compareLines);
$("ask").addEventListener("submit", (event) => { event.preventDefault(); send(); });
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  history.length = 0;
  $("conversation").textContent = "";
  $("stats").textContent = "";
  showError("");
});
loadModel();
