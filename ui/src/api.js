// The REST API as the page uses it: one `api()` call that sends the token
// (kept in sessionStorage for this tab only) as a header and turns a
// refusal into an ApiError carrying the server's `detail` and `code`, and
// `followEvents()`, the Server-Sent Events of GET /events read over fetch
// (so the token travels as a header, never in a URL) with resume through
// Last-Event-ID after a broken connection.

const KEY = 'vman.token';

export const auth = {
  token: sessionStorage.getItem(KEY) || null,
  // Called when the server answers 401 (no token, or a wrong one).
  onUnauthorized: () => {},
};

export function saveToken(token) {
  auth.token = token;
  sessionStorage.setItem(KEY, token);
}

export function forgetToken() {
  auth.token = null;
  sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, detail, code) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.code = code || null;
  }
}

function headers(token, extra) {
  const h = { Accept: 'application/json', ...extra };
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

function detailOf(json, text, status) {
  if (json && typeof json.detail === 'string') return json.detail;
  if (json && Array.isArray(json.detail)) {
    return json.detail.map((d) => (d && d.msg) || JSON.stringify(d)).join('; ');
  }
  return text ? text.slice(0, 300) : `HTTP ${status}`;
}

/// One request. `body` (an object) is sent as JSON. `opts.token` overrides
/// the saved token (the login form tries a candidate); `opts.accept` lists
/// statuses whose JSON body is returned instead of thrown (503 of /health).
export async function api(method, path, body, opts = {}) {
  const token = opts.token !== undefined ? opts.token : auth.token;
  const init = { method, headers: headers(token), cache: 'no-store' };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `vman is unreachable (${e.message})`, 'unreachable');
  }
  const text = await resp.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (resp.ok || (opts.accept || []).includes(resp.status)) return json;
  const err = new ApiError(resp.status, detailOf(json, text, resp.status), json && json.code);
  if (resp.status === 401 && opts.token === undefined) auth.onUnauthorized(err);
  throw err;
}

export const seg = (s) => encodeURIComponent(s);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/// Follows GET /events from after event `since` (no gap, no duplicate:
/// the server replays what came after it, then streams). Calls
/// `onEvent(event)` for each and `onStatus('live'|'reconnecting')`; on a
/// broken stream it reconnects with Last-Event-ID = the last id seen.
/// Returns a function that stops it.
export function followEvents(since, onEvent, onStatus) {
  let last = since;
  let stopped = false;
  let ctrl = null;

  function dispatch(block) {
    let id = null;
    const data = [];
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) continue;
      const i = line.indexOf(':');
      const field = i < 0 ? line : line.slice(0, i);
      let value = i < 0 ? '' : line.slice(i + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'id') id = value;
      else if (field === 'data') data.push(value);
    }
    if (id !== null && /^\d+$/.test(id)) last = Number(id);
    if (data.length === 0) return;
    let event;
    try {
      event = JSON.parse(data.join('\n'));
    } catch {
      return;
    }
    onEvent(event);
  }

  (async () => {
    let delay = 250;
    while (!stopped) {
      ctrl = new AbortController();
      try {
        const h = headers(auth.token, { Accept: 'text/event-stream' });
        if (last !== null && last !== undefined) h['Last-Event-ID'] = String(last);
        const resp = await fetch('/events', { headers: h, signal: ctrl.signal, cache: 'no-store' });
        if (resp.status === 401) {
          auth.onUnauthorized(new ApiError(401, 'The API token was refused', 'unauthorized'));
          return;
        }
        if (!resp.ok || !resp.body) throw new Error(`HTTP ${resp.status}`);
        onStatus('live');
        delay = 250;
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
          let cut;
          while ((cut = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            dispatch(block);
          }
        }
      } catch {
        // Aborted, refused or broken: reconnect below unless stopped.
      }
      if (stopped) return;
      onStatus('reconnecting');
      await sleep(delay);
      delay = Math.min(delay * 2, 5000);
    }
  })();

  return () => {
    stopped = true;
    if (ctrl) ctrl.abort();
  };
}
