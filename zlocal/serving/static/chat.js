// zlocal's built-in chat page: streams /v1/chat/completions over SSE from the server that served it.
// No dependencies and no external requests (the page's Content-Security-Policy forbids them).
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // the conversation sent with every request: {role, content}
let controller = null; // the AbortController of the request in flight

function setState(text) {
  $("state").textContent = text;
  document.body.dataset.state = text;
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text; // always text, never HTML: the model's output is not trusted markup
  box.append(label, body);
  $("log").append(box);
  box.scrollIntoView({ block: "end" });
  return body;
}

function headers() {
  const out = { "Content-Type": "application/json", Accept: "text/event-stream" };
  const key = $("api-key").value.trim();
  if (key) out.Authorization = "Bearer " + key;
  return out;
}

// The request body, or an Error naming the field the user has to fix.
function buildBody(messages) {
  const body = { messages, stream: true };
  const temperature = $("temperature").value.trim();
  if (temperature !== "") body.temperature = Number(temperature);
  const maxTokens = $("max-tokens").value.trim();
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  if ($("json-mode").checked) {
    let schema;
    try {
      schema = JSON.parse($("schema").value);
    } catch (err) {
      throw new Error("the JSON schema is not valid JSON: " + err.message);
    }
    if (schema === null || typeof schema !== "object" || Array.isArray(schema)) {
      throw new Error("the JSON schema must be a JSON object");
    }
    body.response_format = {
      type: "json_schema",
      json_schema: { name: "page", schema, strict: true },
    };
  }
  return body;
}

// The server's error message from a non-2xx answer (an OpenAI error object when it is zlocal).
async function errorText(resp) {
  try {
    const data = await resp.json();
    if (data && data.error && data.error.message) return `${resp.status}: ${data.error.message}`;
  } catch (_) {
    // not JSON: fall through to the status line
  }
  return `${resp.status} ${resp.statusText}`;
}

// Feeds SSE bytes in and calls onEvent with each parsed `data:` payload ("[DONE]" stays a string).
function sseParser(onEvent) {
  let buffer = "";
  return (chunk) => {
    buffer += chunk;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        onEvent(data === "[DONE]" ? data : JSON.parse(data));
      }
    }
  };
}

// Decoding speed: the tokens after the first over the time since the first arrived (the wait for the
// first token is the prompt's prefill, not decoding).
function showSpeed(tokens, first) {
  const seconds = (performance.now() - first) / 1000;
  const rate = tokens > 1 && seconds > 0 ? ((tokens - 1) / seconds).toFixed(1) : "–";
  $("tps").textContent = `${rate} tok/s (${tokens} tokens)`;
  $("tps").dataset.tokens = String(tokens);
}

async function streamReply(resp, target) {
  const decoder = new TextDecoder();
  const reader = resp.body.getReader();
  let text = "";
  let tokens = 0;
  let started = null; // when the first token arrived
  const feed = sseParser((event) => {
    if (event === "[DONE]") return;
    if (event.error) throw new Error(event.error.message || "the server reported an error");
    const delta = event.choices && event.choices[0] && event.choices[0].delta;
    if (!delta || !delta.content) return;
    if (started === null) started = performance.now();
    text += delta.content;
    tokens += 1; // the server sends one chunk per generated token
    target.textContent = text;
    showSpeed(tokens, started);
  });
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    feed(decoder.decode(value, { stream: true }));
  }
  return text;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send() {
  const prompt = $("prompt").value;
  if (!prompt.trim() || controller) return;
  const system = $("system").value.trim();
  const messages = [...history, { role: "user", content: prompt }];
  let body;
  try {
    body = buildBody(system ? [{ role: "system", content: system }, ...messages] : messages);
  } catch (err) {
    addMessage("error", err.message);
    setState("error");
    return;
  }
  controller = new AbortController();
  setBusy(true);
  setState("waiting");
  addMessage("user", prompt);
  $("prompt").value = "";
  const target = addMessage("assistant", "");
  let text = "";
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    setState("streaming");
    text = await streamReply(resp, target);
    setState("done");
  } catch (err) {
    if (err.name === "AbortError") {
      setState("stopped"); // closing the connection makes the server cancel the generation
      text = target.textContent;
    } else {
      target.parentElement.remove();
      addMessage("error", err.message);
      setState("error");
    }
  } finally {
    controller = null;
    setBusy(false);
  }
  if (text) history.push({ role: "user", content: prompt }, { role: "assistant", content: text });
}

function init() {
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => {
    history.length = 0;
    $("log").replaceChildren();
    setState("idle");
  });
  $("json-mode").addEventListener("change", () => {
    $("schema").hidden = !$("json-mode").checked;
  });
  setState("idle");
}

init();
