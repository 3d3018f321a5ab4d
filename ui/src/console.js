// The serial console of one VM in xterm.js: the tail of console.txt first
// (GET /vms/{id}/console, also for a stopped VM), then live over the WebSocket
// /vms/{id}/console/ws both ways. The fit add-on keeps the terminal the
// size of its box; Ctrl+Shift+C / Ctrl+Shift+V (and the buttons) copy the
// selection and paste. Browsers cannot set headers on a WebSocket, so the
// token goes as `?token=` (vman's request log writes the path only).

import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import '@xterm/xterm/css/xterm.css';
import { api, auth, seg } from './api.js';

export function openConsole(box, vmId, onState) {
  const term = new Terminal({
    scrollback: 10000,
    cursorBlink: true,
    convertEol: false,
    fontSize: 14,
    fontFamily: 'ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace',
    screenReaderMode: false,
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(box);
  const refit = () => {
    try {
      fit.fit();
    } catch {
      // Not laid out yet (hidden box): the next resize fits it.
    }
  };
  refit();
  const observer = new ResizeObserver(refit);
  observer.observe(box);

  let ws = null;
  let disposed = false;
  // What the console printed before (also of a stopped VM), written before
  // anything live.
  const tail = (async () => {
    try {
      const t = await api('GET', `/vms/${seg(vmId)}/console`);
      if (t && t.console && !disposed) term.write(t.console);
    } catch {
      // No console yet: nothing to show.
    }
  })();

  const send = (data) => {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(data);
  };
  term.onData(send);
  term.onBinary((s) => send(Uint8Array.from(s, (c) => c.charCodeAt(0))));

  async function copy() {
    const text = term.getSelection();
    if (text) await navigator.clipboard.writeText(text);
    return text;
  }
  async function paste() {
    const text = await navigator.clipboard.readText();
    if (text) term.paste(text);
  }
  term.attachCustomKeyEventHandler((e) => {
    if (e.type !== 'keydown' || !e.ctrlKey || !e.shiftKey) return true;
    if (e.code === 'KeyC') {
      copy().catch(() => {});
      return false;
    }
    if (e.code === 'KeyV') {
      paste().catch(() => {});
      return false;
    }
    return true;
  });

  async function connect() {
    if (disposed) return;
    if (ws && (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING)) return;
    await tail;
    if (disposed || (ws && ws.readyState <= WebSocket.OPEN)) return;
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let url = `${proto}//${location.host}/vms/${seg(vmId)}/console/ws`;
    if (auth.token) url += `?token=${encodeURIComponent(auth.token)}`;
    onState('connecting', '');
    const socket = new WebSocket(url);
    ws = socket;
    socket.binaryType = 'arraybuffer';
    socket.onopen = () => {
      onState('open', '');
      refit();
    };
    socket.onmessage = (m) => {
      term.write(typeof m.data === 'string' ? m.data : new Uint8Array(m.data));
    };
    socket.onclose = (e) => {
      if (ws !== socket) return;
      ws = null;
      const why = e.reason || (e.code === 1006 ? 'the VM is not running, or vman refused the connection' : `code ${e.code}`);
      onState('closed', why);
    };
  }

  return {
    term,
    connect,
    copy,
    paste,
    focus: () => term.focus(),
    isOpen: () => !!ws && ws.readyState === WebSocket.OPEN,
    dispose() {
      disposed = true;
      observer.disconnect();
      if (ws) {
        const s = ws;
        ws = null;
        s.close(1000, 'page closed');
      }
      term.dispose();
    },
  };
}
