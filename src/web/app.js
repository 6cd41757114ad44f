// The chat web client: the binary protocol of docs/PROTOCOL.md over a WebSocket, one
// frame per binary message. Plain JavaScript, no build step, no third-party code.
//
// Each tab is a device of its own (a session, docs/PROTOCOL.md "Sessions"), named once
// per tab and kept in sessionStorage, so a reload resumes the same device and two tabs
// or two browsers of one id are online together. (Tabs sharing one device would
// replace each other's connection; sharing it without that needs one tab to hold the
// connection for the others.) A server without sessions (a cluster, for now) gets a
// hello with acks instead, and the page keeps what it sees in memory only.
'use strict';

const CONTROL = 0, TEXT = 1, PICTURE = 2, VOICE = 3, VIDEO = 4;
const OP_HELLO_ACKS = 3, OP_ACK = 2, OP_SESSION = 4, OP_HISTORY = 5, OP_CONVERSATIONS = 6, OP_READ = 7;
// What a message on a session is (its envelope's second byte).
const DELIVERY = 0, ECHO = 1, COPY = 2, PAGE = 3;
const PAGE_SIZE = 30;
const RETRY_MIN = 500, RETRY_MAX = 10000;
const encoder = new TextEncoder();
const decoder = new TextDecoder();
const $ = (id) => document.getElementById(id);

// What the server told us about itself (GET /config.json).
let config = { maxFrameBytes: 8 * 1024 * 1024, auth: false };

const state = {
  me: 0,
  token: '',
  ws: null,
  online: false,
  // Our own frames whose echo has not come, in the order sent: the echo (or the
  // notice sent instead of it) answers the oldest.
  pending: [],
  // Acks: data frames from others received since the welcome, and the count last acked.
  received: 0,
  acked: 0,
  ackTimer: null,
  retries: 0,
  retryTimer: null,
  // Set when the server told us to stop (replaced, auth-failed) or we signed out.
  stopped: true,
  conversations: new Map(),
  current: 0,
  // This tab's device, and whether the server took the session (else: plain acks).
  device: '',
  session: false,
  triedSession: false,
  // Queries in flight: request number -> what it was for.
  requests: new Map(),
  nextRequest: 1,
};

// ---- frames -------------------------------------------------------------------------

function clientFrame(sender, receiver, type, body) {
  const bytes = new Uint8Array(13 + body.byteLength);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, sender);
  view.setUint32(4, receiver);
  view.setUint8(8, type);
  view.setUint32(9, body.byteLength);
  bytes.set(body, 13);
  return bytes;
}

function serverFrame(buffer) {
  if (buffer.byteLength < 9) return null;
  const view = new DataView(buffer);
  const length = view.getUint32(5);
  if (9 + length !== buffer.byteLength) return null;
  return {
    sender: view.getUint32(0),
    type: view.getUint8(4),
    body: new Uint8Array(buffer, 9, length),
  };
}

function u32(n) {
  const bytes = new Uint8Array(4);
  new DataView(bytes.buffer).setUint32(0, n);
  return bytes;
}

// Offsets and times are u64 on the wire, below 2^53 (microseconds and milliseconds
// since 1970), so a Number holds them exactly.
function u64At(view, at) {
  return view.getUint32(at) * 2 ** 32 + view.getUint32(at + 4);
}

function u64(n) {
  const bytes = new Uint8Array(8);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, Math.floor(n / 2 ** 32));
  view.setUint32(4, n % 2 ** 32);
  return bytes;
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}

function sessionHello() {
  const name = encoder.encode(state.device);
  return clientFrame(state.me, OP_SESSION, CONTROL,
    concat(new Uint8Array([1, name.byteLength]), name, encoder.encode(state.token)));
}

function newDevice() {
  const bytes = crypto.getRandomValues(new Uint8Array(4));
  state.device = 'web-' + [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
  sessionStorage.setItem('chat.device', state.device);
}

// Asks the server something on the session; `what` says what the answer is for.
function ask(op, what, ...fields) {
  const request = state.nextRequest++;
  state.requests.set(request, what);
  send(clientFrame(state.me, op, CONTROL, concat(u32(request), ...fields)));
  return request;
}

function u16(n) {
  const bytes = new Uint8Array(2);
  new DataView(bytes.buffer).setUint16(0, n);
  return bytes;
}

// ---- connection ---------------------------------------------------------------------

function connect() {
  clearTimeout(state.retryTimer);
  state.stopped = false;
  const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
  const ws = new WebSocket(scheme + location.host + '/ws');
  ws.binaryType = 'arraybuffer';
  state.ws = ws;
  setStatus('connecting…');
  ws.onopen = () => {
    state.session = false;
    if (state.triedSession) {
      ws.send(clientFrame(state.me, OP_HELLO_ACKS, CONTROL, encoder.encode(state.token)));
    } else {
      ws.send(sessionHello());
    }
  };
  ws.onmessage = (event) => {
    if (typeof event.data === 'string') return;
    const frame = serverFrame(event.data);
    if (frame) receive(frame);
  };
  ws.onclose = () => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.online = false;
    if (!state.stopped) reconnectLater();
  };
}

function reconnectLater() {
  const base = Math.min(RETRY_MAX, RETRY_MIN * 2 ** state.retries);
  const delay = Math.round(base * (0.5 + Math.random() / 2));
  state.retries += 1;
  setStatus(`offline, retrying in ${Math.ceil(delay / 1000)} s`);
  state.retryTimer = setTimeout(connect, delay);
}

function send(bytes) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(bytes);
}

function receive(frame) {
  if (frame.type === CONTROL && frame.sender === 0) {
    if (frame.body.length > 0 && frame.body[0] < 0x20) return record(frame.body);
    return notice(decoder.decode(frame.body));
  }
  if (state.session) return sessionMessage(frame);
  if (frame.sender === state.me) return echoed();
  const conversation = conversationWith(frame.sender);
  const message = { outgoing: false, type: frame.type, body: frame.body.slice(), at: new Date() };
  conversation.messages.push(message);
  if (state.current !== frame.sender || document.hidden) conversation.unread += 1;
  conversation.last = message.at;
  if (state.current === frame.sender) appendMessage(message);
  renderConversations();
  // Shown: acknowledge it (one ack covers every frame before it).
  state.received = (state.received + 1) >>> 0;
  scheduleAck();
}

function scheduleAck() {
  if (state.ackTimer) return;
  state.ackTimer = setTimeout(() => {
    state.ackTimer = null;
    if (state.online && state.acked !== state.received) {
      send(clientFrame(state.me, OP_ACK, CONTROL, u32(state.received)));
      state.acked = state.received;
    }
  }, 50);
}

// A message on a session: its envelope says what it is, where it belongs and its
// place in the id's log (the offset, the same on every device of the id).
function sessionMessage(frame) {
  const body = frame.body;
  if (body.length < 26 || body[0] < 26 || body.length < body[0]) return;
  const view = new DataView(body.buffer, body.byteOffset, body.byteLength);
  const what = body[1];
  const offset = u64At(view, 2);
  const at = new Date(u64At(view, 10));
  const peer = view.getUint32(18);
  const request = view.getUint32(22);
  const payload = body.slice(body[0]);
  if (what === ECHO) return echoed(offset, at);
  const outgoing = frame.sender === state.me;
  const m = { outgoing, type: frame.type, body: payload, at, offset, status: outgoing ? 'sent' : undefined };
  const conversation = conversationWith(peer);
  if (what === PAGE) return place(conversation, m, true);
  // A delivery or a copy from another device: acks count both.
  state.received = (state.received + 1) >>> 0;
  scheduleAck();
  if (!place(conversation, m, false)) return;
  if (!outgoing) {
    if (state.current === peer && !document.hidden) markRead(conversation);
    else conversation.unread += 1;
  }
  renderConversations();
}

// Puts a message in its conversation in the order of offsets, once: false if it was
// there already (a page and a delivery can bring the same message).
function place(conversation, m, older) {
  if (conversation.offsets.has(m.offset)) return false;
  conversation.offsets.add(m.offset);
  const list = conversation.messages;
  let i = list.length;
  while (i > 0 && (list[i - 1].offset === undefined || list[i - 1].offset > m.offset)) i -= 1;
  list.splice(i, 0, m);
  if (m.at > conversation.last) conversation.last = m.at;
  if (!m.outgoing) conversation.lastIncoming = Math.max(conversation.lastIncoming, m.offset);
  if (state.current === conversation.peer) {
    if (older) renderMessages(conversation, true);
    else if (i === list.length - 1) appendMessage(m);
    else renderMessages(conversation, false);
  }
  return true;
}

// The server's structured answers on a session.
function record(body) {
  const view = new DataView(body.buffer, body.byteOffset, body.byteLength);
  switch (body[0]) {
    case 1: // sync: this device's place; now ask for the conversations.
      // new u8 · head · oldest · backlog · missed
      if (u64At(view, 26) > 0) {
        showBanner(`${u64At(view, 26)} messages for this tab were dropped before it got them (the server's limit).`);
      }
      ask(OP_CONVERSATIONS, { kind: 'list' }, u64(0), u16(100));
      return;
    case 3: { // page-end
      const what = state.requests.get(view.getUint32(1));
      state.requests.delete(view.getUint32(1));
      if (what && what.kind === 'history') {
        const c = conversationWith(what.peer);
        c.more = body[5] === 1;
        c.next = u64At(view, 6);
        c.loading = false;
        if (state.current === c.peer && !document.hidden) markRead(c);
      }
      if (what && what.kind === 'list' && state.current) loadHistory(conversationWith(state.current));
      return renderConversations();
    }
    case 4: { // a conversation: request · peer · last · time · unread · read
      const c = conversationWith(view.getUint32(5));
      c.unread = state.current === c.peer ? 0 : view.getUint32(25);
      c.read = Math.max(c.read, u64At(view, 29));
      c.last = new Date(Math.max(c.last, u64At(view, 17)));
      return;
    }
    case 5: { // a read marker moved, on this tab or another device
      const c = conversationWith(view.getUint32(1));
      c.read = Math.max(c.read, u64At(view, 5));
      c.unread = view.getUint32(13);
      return renderConversations();
    }
    case 6: // a query refused
      return showBanner(`The server refused a request: ${decoder.decode(body.slice(5))}`);
    default:
      return;
  }
}

// The newest page of a conversation, once; older pages as the reader scrolls up.
function loadHistory(c) {
  if (!state.session || c.loaded || c.loading) return;
  c.loaded = true;
  c.loading = true;
  ask(OP_HISTORY, { kind: 'history', peer: c.peer }, u32(c.peer), u64(0), u16(PAGE_SIZE));
}

function loadOlder(c) {
  if (!state.session || !c.more || c.loading) return;
  c.loading = true;
  ask(OP_HISTORY, { kind: 'history', peer: c.peer }, u32(c.peer), u64(c.next), u16(PAGE_SIZE));
}

// Tells the server (and so every device of the id) that this conversation is read.
function markRead(c) {
  if (!state.session || c.lastIncoming <= c.read) {
    c.unread = 0;
    return;
  }
  c.read = c.lastIncoming;
  c.unread = 0;
  ask(OP_READ, { kind: 'read' }, u32(c.peer), u64(c.lastIncoming));
}

// The server's notices, in plain words.
const WORDS = {
  'mailbox-full': 'Not sent: their mailbox is full. Try again once they have read it.',
  'store-failed': 'Not sent: the server could not store it. Try again.',
  'bad-sender': 'Not sent: the server refused it.',
  'slow-consumer': 'This tab fell behind and the server disconnected it. Reconnecting; nothing is lost.',
  'frame-too-large': 'A message was too large for the server. Reconnecting.',
  'bad-message': 'The server refused a malformed message. Reconnecting.',
  'timeout': 'The connection stalled. Reconnecting.',
  'server-busy': 'The server is full right now. Retrying.',
  'shutting-down': 'The server is restarting. Reconnecting.',
  'too-many-devices': 'This id has too many tabs and devices online. Close one, then reload.',
  'rate-limited': 'You are sending faster than the server allows; your messages are sent more slowly, none is lost.',
};

function notice(text) {
  const colon = text.indexOf(': ');
  const code = colon < 0 ? text : text.slice(0, colon);
  const detail = colon < 0 ? '' : text.slice(colon + 2);
  switch (code) {
    case 'welcome':
      state.online = true;
      state.session = !state.triedSession;
      state.retries = 0;
      state.received = 0;
      state.acked = 0;
      setStatus('online');
      hideBanner();
      // Frames whose echo never came are sent again (at least once).
      for (const p of state.pending) send(clientFrame(state.me, p.peer, p.message.type, p.message.body));
      return;
    case 'acks-on':
    case 'pong':
      return;
    case 'bad-control':
      if (!state.online && !state.triedSession) {
        // The server has no sessions: a hello with acks, as before them.
        state.triedSession = true;
        send(clientFrame(state.me, OP_HELLO_ACKS, CONTROL, encoder.encode(state.token)));
        return;
      }
      return showBanner(`${code}: ${detail}`);
    case 'mailbox-full':
    case 'store-failed':
    case 'bad-sender':
      return failed(WORDS[code]);
    case 'replaced':
      if (state.session) {
        // Another tab took this tab's device (a duplicated tab copies its storage):
        // this one becomes a device of its own.
        newDevice();
        return;
      }
      state.stopped = true;
      setStatus('signed in elsewhere');
      return showBanner('You signed in with this id somewhere else, so this tab stopped.', 'Use this tab', () => connect());
    case 'disconnected':
      // An operator disconnected this id (or blocked it): coming straight back would
      // undo that, so the tab waits for its user.
      state.stopped = true;
      setStatus('disconnected');
      return showBanner(`Disconnected by the server's operator: ${detail}`, 'Connect again', () => connect());
    case 'too-many-devices':
      state.stopped = true;
      setStatus('too many devices');
      return showBanner(WORDS[code], 'Try again', () => connect());
    case 'reconnect': {
      // The server is draining: a new connection reaches another node, opened at
      // once; the old one is let go (its close is no longer this tab's concern).
      const old = state.ws;
      state.ws = null;
      state.online = false;
      connect();
      if (old) old.close();
      return;
    }
    case 'auth-failed':
      state.stopped = true;
      return signedOut(`Sign-in refused: ${detail}`);
    default:
      return showBanner(WORDS[code] || `${code}: ${detail}`);
  }
}

function echoed(offset, at) {
  const p = state.pending.shift();
  if (!p) return;
  p.message.status = 'sent';
  if (offset) {
    // Its place in the log: a page or another device's copy of it is the same message.
    p.message.offset = offset;
    p.message.at = at;
    conversationWith(p.peer).offsets.add(offset);
  }
  updateMessage(p.message);
}

function failed(words) {
  const p = state.pending.shift();
  if (p) {
    p.message.status = 'failed';
    p.message.reason = words;
    updateMessage(p.message);
  }
  showBanner(words);
}

// ---- conversations ------------------------------------------------------------------

function conversationWith(peer) {
  let c = state.conversations.get(peer);
  if (!c) {
    c = {
      peer, messages: [], unread: 0, last: new Date(0),
      // Session bookkeeping: offsets held, the read marker, the newest message from the
      // peer, whether history was asked for, and where the next older page starts.
      offsets: new Set(), read: 0, lastIncoming: 0, loaded: false, loading: false, more: false, next: 0,
    };
    state.conversations.set(peer, c);
  }
  return c;
}

function open(peer) {
  state.current = peer;
  const conversation = conversationWith(peer);
  conversation.unread = 0;
  $('peer-title').textContent = `id ${peer}`;
  $('composer').hidden = false;
  $('app').classList.add('in-conversation');
  renderMessages(conversation, false);
  loadHistory(conversation);
  markRead(conversation);
  renderConversations();
  $('text').focus();
}

// Draws a conversation's messages again; `keep` holds the reader's place when older
// ones came in above.
function renderMessages(conversation, keep) {
  const list = $('messages');
  const fromBottom = list.scrollHeight - list.scrollTop;
  list.replaceChildren();
  for (const m of conversation.messages) appendMessage(m);
  if (keep) list.scrollTop = list.scrollHeight - fromBottom;
}

function renderConversations() {
  const list = $('conversations');
  const sorted = [...state.conversations.values()].sort((a, b) => b.last - a.last);
  list.replaceChildren(...sorted.map((c) => {
    const button = document.createElement('button');
    button.type = 'button';
    button.dataset.peer = c.peer;
    if (c.peer === state.current) button.classList.add('current');
    const name = document.createElement('span');
    name.className = 'peer';
    name.textContent = `id ${c.peer}`;
    const preview = document.createElement('span');
    preview.className = 'preview';
    const last = c.messages[c.messages.length - 1];
    preview.textContent = last ? summary(last) : '';
    button.append(name, preview);
    if (c.unread) {
      const badge = document.createElement('span');
      badge.className = 'unread';
      badge.textContent = c.unread;
      button.append(badge);
    }
    button.onclick = () => open(c.peer);
    const item = document.createElement('li');
    item.append(button);
    return item;
  }));
}

function summary(m) {
  switch (m.type) {
    case TEXT: return decoder.decode(m.body);
    case PICTURE: return 'Picture';
    case VOICE: return 'Voice message';
    case VIDEO: return 'Video';
    default: return `File (type ${m.type})`;
  }
}

// ---- messages -----------------------------------------------------------------------

// The media type a received body most likely has, so the browser can play it.
function sniff(b) {
  const starts = (...bytes) => bytes.every((x, i) => b[i] === x);
  if (starts(0x1a, 0x45, 0xdf, 0xa3)) return 'video/webm';
  if (starts(0x4f, 0x67, 0x67, 0x53)) return 'audio/ogg';
  if (starts(0x52, 0x49, 0x46, 0x46)) return 'audio/wav';
  if (starts(0x49, 0x44, 0x33) || starts(0xff, 0xfb)) return 'audio/mpeg';
  if (b[4] === 0x66 && b[5] === 0x74 && b[6] === 0x79 && b[7] === 0x70) return 'video/mp4';
  return '';
}

function blobUrl(m) {
  if (!m.url) m.url = URL.createObjectURL(new Blob([m.body], { type: m.mime || sniff(m.body) }));
  return m.url;
}

function content(m) {
  switch (m.type) {
    case TEXT: {
      const p = document.createElement('div');
      p.className = 'text';
      p.textContent = decoder.decode(m.body);
      return p;
    }
    case PICTURE: {
      const img = document.createElement('img');
      img.alt = 'Picture';
      img.src = blobUrl(m);
      return img;
    }
    case VOICE: {
      const audio = document.createElement('audio');
      audio.controls = true;
      audio.src = blobUrl(m);
      return audio;
    }
    case VIDEO: {
      const video = document.createElement('video');
      video.controls = true;
      video.playsInline = true;
      video.src = blobUrl(m);
      return video;
    }
    default: {
      const a = document.createElement('a');
      a.href = blobUrl(m);
      a.download = `message-type-${m.type}.bin`;
      a.textContent = `Download file (type ${m.type}, ${size(m.body.byteLength)})`;
      return a;
    }
  }
}

function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

function appendMessage(m) {
  const item = document.createElement('li');
  item.className = m.outgoing ? 'msg out' : 'msg in';
  item.dataset.type = m.type;
  item.append(content(m));
  const meta = document.createElement('div');
  meta.className = 'meta';
  item.append(meta);
  m.element = item;
  updateMessage(m);
  const list = $('messages');
  list.append(item);
  list.scrollTop = list.scrollHeight;
}

function updateMessage(m) {
  if (!m.element) return;
  const time = m.at.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  let status = '';
  if (m.outgoing) {
    status = { sending: ' · sending…', sent: ' · sent', failed: ` · ${m.reason}` }[m.status];
    m.element.dataset.status = m.status;
  }
  m.element.querySelector('.meta').textContent = time + status;
}

function sendMessage(type, body, mime) {
  const peer = state.current;
  if (!peer) return;
  if (body.byteLength > config.maxFrameBytes) {
    showBanner(`That is ${size(body.byteLength)}; this server takes at most ${size(config.maxFrameBytes)} per message.`);
    return;
  }
  const message = { outgoing: true, type, body, mime, at: new Date(), status: 'sending' };
  const conversation = conversationWith(peer);
  conversation.messages.push(message);
  conversation.last = message.at;
  appendMessage(message);
  renderConversations();
  state.pending.push({ peer, message });
  if (state.online) send(clientFrame(state.me, peer, type, body));
}

async function sendFile(file) {
  const type = file.type.startsWith('image/') ? PICTURE
    : file.type.startsWith('audio/') ? VOICE
    : file.type.startsWith('video/') ? VIDEO
    : 5;
  sendMessage(type, new Uint8Array(await file.arrayBuffer()), file.type);
}

// ---- voice --------------------------------------------------------------------------

let recorder = null;

async function toggleRecording() {
  const button = $('record');
  if (recorder) {
    recorder.stop();
    return;
  }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    showBanner('Recording needs a browser with a microphone, on an https:// page (or localhost).');
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    showBanner(`No microphone: ${e.message}`);
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => chunks.push(e.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    const blob = new Blob(chunks, { type: recorder.mimeType });
    recorder = null;
    button.classList.remove('recording');
    button.setAttribute('aria-label', 'Record a voice message');
    sendMessage(VOICE, new Uint8Array(await blob.arrayBuffer()), blob.type);
  };
  recorder.start();
  button.classList.add('recording');
  button.setAttribute('aria-label', 'Stop recording and send');
}

// ---- page ---------------------------------------------------------------------------

function setStatus(text) {
  const status = $('status');
  status.textContent = text;
  status.classList.toggle('online', text === 'online');
}

function showBanner(text, action, onAction) {
  $('banner-text').textContent = text;
  const button = $('banner-action');
  button.hidden = !action;
  if (action) {
    button.textContent = action;
    button.onclick = () => { hideBanner(); onAction(); };
  }
  $('banner').hidden = false;
}

function hideBanner() {
  $('banner').hidden = true;
}

function signIn(id, token) {
  state.me = id;
  state.token = token;
  state.device = sessionStorage.getItem('chat.device') || '';
  if (!state.device) newDevice();
  localStorage.setItem('chat.id', String(id));
  sessionStorage.setItem('chat.token', token);
  $('me').textContent = `id ${id}`;
  $('signin').hidden = true;
  $('app').hidden = false;
  connect();
}

function signedOut(error) {
  state.stopped = true;
  clearTimeout(state.retryTimer);
  if (state.ws) state.ws.close();
  state.ws = null;
  state.online = false;
  state.pending = [];
  state.conversations.clear();
  state.current = 0;
  $('messages').replaceChildren();
  $('conversations').replaceChildren();
  $('composer').hidden = true;
  $('app').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = error || '';
  sessionStorage.removeItem('chat.token');
}

async function start() {
  try {
    const response = await fetch('config.json', { cache: 'no-store' });
    if (response.ok) config = await response.json();
  } catch (e) {
    // Keep the defaults; the server will refuse what it must.
  }
  $('token-label').hidden = !config.auth;
  $('signin-form').onsubmit = (e) => {
    e.preventDefault();
    const id = Number($('my-id').value);
    if (!Number.isInteger(id) || id < 1 || id > 0xffffffff) {
      $('signin-error').textContent = 'An id is a whole number from 1 to 4294967295.';
      return;
    }
    signIn(id, $('token').value.trim());
  };
  $('new-chat').onsubmit = (e) => {
    e.preventDefault();
    const peer = Number($('peer-id').value);
    if (!Number.isInteger(peer) || peer < 1 || peer > 0xffffffff) return;
    $('peer-id').value = '';
    open(peer);
  };
  $('composer').onsubmit = (e) => {
    e.preventDefault();
    const text = $('text').value;
    if (!text) return;
    $('text').value = '';
    sendMessage(TEXT, encoder.encode(text));
  };
  $('text').addEventListener('paste', (e) => {
    for (const item of e.clipboardData.items) {
      const file = item.kind === 'file' ? item.getAsFile() : null;
      if (file && file.type.startsWith('image/')) {
        e.preventDefault();
        sendFile(file);
      }
    }
  });
  $('attach').onclick = () => $('file').click();
  $('file').onchange = async () => {
    for (const file of $('file').files) await sendFile(file);
    $('file').value = '';
  };
  $('record').onclick = toggleRecording;
  $('messages').addEventListener('scroll', () => {
    if (state.current && $('messages').scrollTop < 40) loadOlder(conversationWith(state.current));
  });
  $('back').onclick = () => {
    state.current = 0;
    $('app').classList.remove('in-conversation');
    renderConversations();
  };
  $('banner-close').onclick = hideBanner;
  $('signout').onclick = () => {
    localStorage.removeItem('chat.id');
    signedOut('');
  };
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden && state.current) markRead(conversationWith(state.current));
    renderConversations();
  });
  const id = Number(localStorage.getItem('chat.id'));
  const token = sessionStorage.getItem('chat.token') || '';
  $('my-id').value = id || '';
  if (id && (!config.auth || token)) signIn(id, token);
}

start();
