// The chat page of `zagreus serve`: talks to the server's own /v1/chat/completions, streaming.
// Conversations, settings and the API key live in the browser's localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const store = {
  get(key, fallback) {
    try {
      const v = localStorage.getItem("zagreus." + key);
      return v === null ? fallback : JSON.parse(v);
    } catch (_) {
      return fallback;
    }
  },
  set(key, value) {
    localStorage.setItem("zagreus." + key, JSON.stringify(value));
  },
  remove(key) {
    localStorage.removeItem("zagreus." + key);
  },
};

const state = {
  chats: store.get("chats", []),
  current: store.get("current", null),
  // Empty temperature or max tokens: the server's defaults (the model's generation config).
  settings: Object.assign({ system: "", temperature: "", max_tokens: "" }, store.get("settings", {})),
  model: null,
  context: null,
  controller: null,
};

// ---- Markdown (a safe subset: everything is escaped first) ----

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function inline(s) {
  // `s` is escaped already.
  const codes = [];
  s = s.replace(/`([^`]+)`/g, (_, c) => {
    codes.push(c);
    return "\u0000" + (codes.length - 1) + "\u0000";
  });
  s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>");
  s = s.replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + codes[Number(i)] + "</code>");
}

function blocks(text) {
  const out = [];
  let para = [];
  let list = null;
  const flush = () => {
    if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
    para = [];
    if (list) out.push("</" + list + ">");
    list = null;
  };
  for (const line of escapeHtml(text).split("\n")) {
    let m;
    if (!line.trim()) {
      flush();
    } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      flush();
      const n = m[1].length;
      out.push("<h" + n + ">" + inline(m[2]) + "</h" + n + ">");
    } else if ((m = line.match(/^\s*(?:[-*+]|(\d+)\.)\s+(.*)$/))) {
      if (para.length) {
        out.push("<p>" + para.map(inline).join("<br>") + "</p>");
        para = [];
      }
      const kind = m[1] ? "ol" : "ul";
      if (list !== kind) {
        if (list) out.push("</" + list + ">");
        out.push("<" + kind + ">");
        list = kind;
      }
      out.push("<li>" + inline(m[2]) + "</li>");
    } else {
      if (list) {
        out.push("</" + list + ">");
        list = null;
      }
      para.push(line);
    }
  }
  flush();
  return out.join("");
}

function markdown(text) {
  // Fenced code blocks keep their whitespace; an unclosed fence (still streaming) runs to the end.
  const parts = text.split(/^```/m);
  let html = "";
  parts.forEach((part, i) => {
    if (i % 2 === 0) {
      html += blocks(part);
    } else {
      const nl = part.indexOf("\n");
      const code = nl < 0 ? "" : part.slice(nl + 1).replace(/\n$/, "");
      html += '<pre><button type="button" class="copy">Copy</button><code>' + escapeHtml(code) + "</code></pre>";
    }
  });
  return html;
}

// ---- Chats ----

function currentChat() {
  let chat = state.chats.find((c) => c.id === state.current);
  if (!chat) {
    chat = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", messages: [] };
    state.chats.unshift(chat);
    state.current = chat.id;
  }
  return chat;
}

function save() {
  store.set("chats", state.chats);
  store.set("current", state.current);
  store.set("settings", state.settings);
}

function renderChats() {
  const ul = $("chats");
  ul.replaceChildren();
  for (const chat of state.chats) {
    const li = document.createElement("li");
    if (chat.id === state.current) li.className = "current";
    const open = document.createElement("button");
    open.className = "open";
    open.type = "button";
    open.textContent = chat.title;
    open.title = chat.title;
    open.onclick = () => {
      if (state.controller) return;
      state.current = chat.id;
      save();
      render();
      $("app").classList.remove("sidebar-open");
    };
    const del = document.createElement("button");
    del.className = "delete";
    del.type = "button";
    del.textContent = "×";
    del.title = "Delete this chat";
    del.onclick = () => {
      if (state.controller) return;
      state.chats = state.chats.filter((c) => c.id !== chat.id);
      if (state.current === chat.id) state.current = state.chats.length ? state.chats[0].id : null;
      save();
      render();
    };
    li.append(open, del);
    ul.append(li);
  }
}

function messageElement(m, index, chat) {
  const div = document.createElement("div");
  div.className = "msg " + m.role;
  div.dataset.index = String(index);
  if (m.role === "assistant") {
    div.innerHTML = markdown(m.content);
  } else {
    div.textContent = m.content;
  }
  if (m.stats) {
    const s = document.createElement("div");
    s.className = "stats";
    s.textContent = m.stats;
    div.append(s);
  }
  const last = index === chat.messages.length - 1;
  if (last && !state.controller) {
    const actions = document.createElement("div");
    actions.className = "actions";
    if (m.role === "assistant") {
      actions.append(button("Regenerate", regenerate));
    }
    const lastUser = chat.messages.map((x) => x.role).lastIndexOf("user");
    if (lastUser >= 0) actions.append(button("Edit last message", editLast));
    div.append(actions);
  }
  return div;
}

function button(label, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.onclick = onclick;
  return b;
}

function render() {
  renderChats();
  const chat = currentChat();
  const box = $("messages");
  box.replaceChildren(...chat.messages.map((m, i) => messageElement(m, i, chat)));
  box.scrollTop = box.scrollHeight;
}

function showError(text) {
  const div = document.createElement("div");
  div.className = "msg error";
  div.setAttribute("role", "alert");
  div.textContent = text;
  $("messages").append(div);
  div.scrollIntoView();
}

// ---- The server ----

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = store.get("apiKey", "");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(resp) {
  try {
    const v = await resp.json();
    if (v && v.error && v.error.message) return v.error.message;
  } catch (_) {
    // Not JSON: the status says it.
  }
  return "The server answered " + resp.status + " " + resp.statusText;
}

async function loadModel() {
  let resp;
  try {
    resp = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    $("status").textContent = "The server cannot be reached; retrying…";
    setTimeout(loadModel, 2000);
    return;
  }
  if (resp.status === 401) {
    $("key-form").hidden = false;
    $("status").textContent = "API key needed";
    return;
  }
  if (resp.status === 503) {
    $("status").textContent = "Loading model…";
    setTimeout(loadModel, 1000);
    return;
  }
  if (!resp.ok) {
    $("status").textContent = await errorText(resp);
    return;
  }
  const v = await resp.json();
  const m = v.data && v.data[0];
  state.model = m ? m.id : "model";
  state.context = m ? m.max_model_len : null;
  $("model-name").textContent = state.model.split("/").pop();
  $("model-name").title = state.model;
  $("status").textContent = state.context ? "context " + state.context + " tokens" : "";
  $("key-form").hidden = true;
  $("forget-key").hidden = !store.get("apiKey", "");
}

async function complete() {
  const chat = currentChat();
  const messages = [];
  if (state.settings.system.trim()) messages.push({ role: "system", content: state.settings.system });
  for (const m of chat.messages) messages.push({ role: m.role, content: m.content });
  const body = {
    model: state.model || "zagreus",
    messages,
    stream: true,
    stream_options: { include_usage: true },
  };
  if (state.settings.temperature !== "") body.temperature = Number(state.settings.temperature);
  if (state.settings.max_tokens !== "") body.max_tokens = Number(state.settings.max_tokens);
  const answer = { role: "assistant", content: "" };
  chat.messages.push(answer);
  state.controller = new AbortController();
  setBusy(true);
  render();
  const el = $("messages").lastElementChild;
  const started = performance.now();
  let first = null;
  let usage = null;
  let stopped = false;
  let failed = null;
  let pending = false;
  const paint = () => {
    pending = false;
    el.innerHTML = markdown(answer.content);
    $("messages").scrollTop = $("messages").scrollHeight;
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!resp.ok) {
      failed = await errorText(resp);
      if (resp.status === 401) $("key-form").hidden = false;
    } else {
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl).trim();
          buf = buf.slice(nl + 1);
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) {
            failed = chunk.error.message;
            continue;
          }
          if (chunk.usage) usage = chunk.usage;
          for (const c of chunk.choices || []) {
            const t = c.delta && c.delta.content;
            if (t) {
              if (first === null) first = performance.now();
              answer.content += t;
              if (!pending) {
                pending = true;
                requestAnimationFrame(paint);
              }
            }
          }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      stopped = true;
    } else {
      failed = "The request failed: " + e.message;
    }
  }
  state.controller = null;
  setBusy(false);
  if (failed && !answer.content) {
    chat.messages.pop();
  } else {
    const secs = first === null ? 0 : (performance.now() - first) / 1000;
    const parts = [state.model ? state.model.split("/").pop() : "model"];
    if (usage) {
      parts.push(usage.completion_tokens + " tokens");
      if (secs > 0 && usage.completion_tokens > 1) parts.push(((usage.completion_tokens - 1) / secs).toFixed(1) + " tok/s");
      if (state.context) parts.push("context " + usage.total_tokens + "/" + state.context);
    } else {
      parts.push(((performance.now() - started) / 1000).toFixed(1) + " s");
    }
    if (stopped) parts.push("stopped");
    answer.stats = parts.join(" · ");
  }
  if (chat.title === "New chat") {
    const u = chat.messages.find((m) => m.role === "user");
    if (u) chat.title = u.content.slice(0, 60);
  }
  save();
  render();
  if (failed) showError(failed);
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = false;
}

function send(text) {
  if (state.controller || !text.trim()) return;
  currentChat().messages.push({ role: "user", content: text });
  $("input").value = "";
  complete();
}

function regenerate() {
  const chat = currentChat();
  if (state.controller || !chat.messages.length) return;
  if (chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
  complete();
}

function editLast() {
  const chat = currentChat();
  if (state.controller) return;
  const i = chat.messages.map((m) => m.role).lastIndexOf("user");
  if (i < 0) return;
  $("input").value = chat.messages[i].content;
  chat.messages.splice(i);
  save();
  render();
  $("input").focus();
}

// ---- Wiring ----

function init() {
  $("system").value = state.settings.system;
  $("temperature").value = state.settings.temperature;
  $("max-tokens").value = state.settings.max_tokens;
  $("system").oninput = (e) => {
    state.settings.system = e.target.value;
    save();
  };
  $("temperature").oninput = (e) => {
    const t = parseFloat(e.target.value);
    state.settings.temperature = t >= 0 && t <= 2 ? t : "";
    save();
  };
  $("max-tokens").oninput = (e) => {
    const n = parseInt(e.target.value, 10);
    state.settings.max_tokens = n > 0 ? n : "";
    save();
  };
  $("composer").onsubmit = (e) => {
    e.preventDefault();
    send($("input").value);
  };
  $("input").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send($("input").value);
    }
  };
  $("stop").onclick = () => {
    if (state.controller) state.controller.abort();
  };
  $("new-chat").onclick = () => {
    if (state.controller) return;
    state.current = null;
    currentChat();
    save();
    render();
    $("input").focus();
  };
  $("toggle-sidebar").onclick = () => $("app").classList.add("sidebar-open");
  $("close-sidebar").onclick = () => $("app").classList.remove("sidebar-open");
  $("key-form").onsubmit = (e) => {
    e.preventDefault();
    store.set("apiKey", $("key").value.trim());
    $("key").value = "";
    loadModel();
  };
  $("forget-key").onclick = () => {
    store.remove("apiKey");
    loadModel();
  };
  $("messages").onclick = (e) => {
    const b = e.target.closest("button.copy");
    if (!b) return;
    const code = b.parentElement.querySelector("code").textContent;
    const done = () => {
      b.textContent = "Copied";
      setTimeout(() => (b.textContent = "Copy"), 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(code).then(done, () => {});
    } else {
      const t = document.createElement("textarea");
      t.value = code;
      document.body.append(t);
      t.select();
      document.execCommand("copy");
      t.remove();
      done();
    }
  };
  render();
  loadModel();
}

init();
