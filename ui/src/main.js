// vman's web console: the views (VM list, create form, VM page with the
// serial console, host page, login) over the REST API. The list is live
// through GET /events: each VM event re-reads that one VM; nothing polls,
// except GET /vms/{id} while a start this tab asked for makes the root
// disk (the API shows copy progress only there, as for the CLI).
// Navigation is in the URL fragment (#/, #/create, #/vm/<id>, #/host), so
// the server serves one page.

import './style.css';
import { api, ApiError, auth, followEvents, forgetToken, saveToken, seg } from './api.js';
import { openConsole } from './console.js';
import { $, bytes, duration, field, fill, h, when } from './dom.js';

const S = {
  authed: false,
  vms: new Map(),
  templates: null,
  lastEventId: null,
  stopEvents: null,
  // id -> the action under way from this tab (buttons stay disabled).
  busy: new Map(),
  // id -> provisioning {method, bytes_done, bytes_total} (or null) while
  // a start from this tab runs.
  starting: new Map(),
  filter: sessionStorage.getItem('vman.filter') || '',
  view: null,
  console: null,
};

const STATES = ['running', 'stopped', 'error'];

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------- errors

function errorText(err) {
  if (err instanceof ApiError) return err.detail;
  return String((err && err.message) || err);
}

function showError(what, err) {
  const box = $('#errors');
  const item = h('div', { class: 'error', role: 'alert' },
    h('strong', {}, `${what}: `),
    h('span', { class: 'detail' }, errorText(err)),
    err && err.code ? h('code', { class: 'code' }, err.code) : null,
    h('button', {
      type: 'button', class: 'link dismiss', 'aria-label': 'Dismiss this message',
      onclick: () => item.remove(),
    }, '×'));
  box.prepend(item);
  while (box.children.length > 5) box.lastChild.remove();
}

function clearErrors() {
  fill($('#errors'));
}

// ------------------------------------------------------------- confirm

function confirmAction(title, text, okLabel) {
  const d = $('#confirm');
  $('#confirm-title').textContent = title;
  $('#confirm-text').textContent = text;
  $('#confirm-ok').textContent = okLabel;
  return new Promise((resolve) => {
    d.returnValue = '';
    d.addEventListener('close', () => resolve(d.returnValue === 'ok'), { once: true });
    d.showModal();
    $('#confirm-cancel').focus();
  });
}

// ------------------------------------------------------------- actions

const ACTIONS = {
  start: { label: 'Start', when: (s) => s !== 'running' },
  stop: {
    label: 'Stop',
    when: (s) => s === 'running',
    confirm: (id) => [`Stop ${id}?`, 'The guest is asked to power off (ACPI); vman ends QEMU if it does not.', 'Stop'],
  },
  restart: {
    label: 'Restart',
    when: (s) => s === 'running',
    confirm: (id) => [`Restart ${id}?`, 'The guest is stopped (ACPI power-off) and started again.', 'Restart'],
  },
  force: {
    label: 'Force stop',
    when: (s) => s !== 'stopped',
    confirm: (id) => [`Force stop ${id}?`, 'QEMU is ended at once, like pulling the plug: what the guest has not written to disk is lost.', 'Force stop'],
  },
  delete: {
    label: 'Delete',
    when: () => true,
    confirm: (id) => [`Delete ${id}?`, 'The VM, its root disk, snapshots and console log are deleted. Its data disks are detached and kept.', 'Delete'],
  },
};

async function startWatching(id, verb) {
  S.starting.set(id, null);
  vmChanged(id);
  let done = false;
  const request = api('POST', `/vms/${seg(id)}/actions/${verb}`).finally(() => {
    done = true;
  });
  (async () => {
    let wait = 100;
    while (!done) {
      await sleep(wait);
      wait = 100;
      if (done) break;
      try {
        const vm = await api('GET', `/vms/${seg(id)}`);
        if (done) break;
        if (S.starting.has(id)) {
          S.starting.set(id, vm.provisioning || null);
          vmChanged(id);
        }
      } catch {
        break;
      }
    }
  })();
  try {
    await request;
  } finally {
    S.starting.delete(id);
    vmChanged(id);
  }
}

async function runAction(id, verb) {
  const a = ACTIONS[verb];
  if (a.confirm) {
    const [title, text, ok] = a.confirm(id);
    if (!(await confirmAction(title, text, ok))) return;
  }
  S.busy.set(id, verb);
  vmChanged(id);
  try {
    if (verb === 'start' || verb === 'restart') await startWatching(id, verb);
    else if (verb === 'stop') await api('POST', `/vms/${seg(id)}/actions/stop`);
    else if (verb === 'force') await api('POST', `/vms/${seg(id)}/actions/stop`, { force: true });
    else if (verb === 'delete') {
      await api('DELETE', `/vms/${seg(id)}`);
      if (S.view === `vm:${id}`) location.hash = '#/';
    }
  } catch (e) {
    showError(`${a.label} ${id}`, e);
  } finally {
    S.busy.delete(id);
    vmChanged(id);
  }
}

function actionButtons(vm) {
  const busy = S.busy.get(vm.id);
  return h('div', { class: 'buttons', role: 'group', 'aria-label': `Actions for ${vm.id}` },
    Object.entries(ACTIONS).filter(([, a]) => a.when(vm.state)).map(([verb, a]) => h('button', {
      type: 'button',
      class: verb === 'delete' || verb === 'force' ? 'danger' : verb === 'start' ? 'primary' : '',
      dataset: { action: verb },
      disabled: !!busy,
      'aria-busy': busy === verb ? 'true' : null,
      'aria-label': `${a.label} ${vm.id}`,
      onclick: () => runAction(vm.id, verb),
    }, busy === verb ? `${a.label}…` : a.label)));
}

// ------------------------------------------------------------ VM parts

function stateBadge(vm) {
  return h('span', { class: `state state-${vm.state}`, dataset: { field: 'state' } }, vm.state);
}

function ramText(t) {
  return t.ram_mib >= 1024 ? `${(t.ram_mib / 1024).toFixed(t.ram_mib % 1024 ? 1 : 0)} GiB` : `${t.ram_mib} MiB`;
}

function ipOf(vm) {
  return (vm.network && vm.network.local_ip) || vm.local_ip || null;
}

function portsText(vm) {
  const ports = (vm.network && vm.network.ports) || [];
  if (ports.length === 0) return '—';
  return ports.map((p) => `${p.host_address}:${p.host_port}→${p.guest_port}/${p.protocol}`).join(', ');
}

function uptime(vm) {
  if (vm.state !== 'running') return h('span', { class: 'muted' }, '—');
  // updated_at is written with every state change: for a running VM, when
  // it became running (or was adopted by this vman).
  return h('span', { dataset: { since: vm.updated_at }, title: `running since ${when(vm.updated_at)}` },
    duration(Date.now() - Date.parse(vm.updated_at)));
}

function progress(id) {
  if (!S.starting.has(id)) return null;
  const p = S.starting.get(id);
  if (!p || !p.bytes_total) {
    return h('div', { class: 'progress', role: 'status', dataset: { progress: id } },
      p ? `making the root disk (${p.method})…` : 'starting…');
  }
  return h('div', { class: 'progress', role: 'status', dataset: { progress: id } },
    h('progress', { max: p.bytes_total, value: p.bytes_done, 'aria-label': `Root disk of ${id}` }),
    ` root disk ${p.method}: ${bytes(p.bytes_done)} / ${bytes(p.bytes_total)}`);
}

// ------------------------------------------------------------- VM data

const inflight = new Map();

/// Re-reads one VM (coalesced: events arriving during a read cause one
/// more read after it) and updates what shows it.
async function refreshVm(id) {
  if (inflight.has(id)) {
    inflight.get(id).again = true;
    return;
  }
  const slot = { again: false };
  inflight.set(id, slot);
  try {
    do {
      slot.again = false;
      try {
        S.vms.set(id, await api('GET', `/vms/${seg(id)}`));
      } catch (e) {
        if (e.status === 404) S.vms.delete(id);
        else if (e.status !== 401) showError(`Reading ${id}`, e);
      }
      vmChanged(id);
    } while (slot.again);
  } finally {
    inflight.delete(id);
  }
}

function vmChanged(id) {
  if (S.view === 'list') renderRows();
  else if (S.view === `vm:${id}`) renderVmPage(id);
}

function onEvent(ev) {
  S.lastEventId = ev.id;
  if (ev.type === 'vm') {
    if (ev.action === 'deleted') {
      S.vms.delete(ev.resource);
      vmChanged(ev.resource);
    }
    refreshVm(ev.resource);
  } else if (ev.type === 'disk') {
    if (S.view && S.view.startsWith('vm:')) loadDisks(S.view.slice(3));
  } else if (ev.type === 'observer') {
    if (S.view === 'host') loadHost();
  } else if (ev.type === 'template') {
    S.templates = null;
    if (S.view === 'host') loadTemplates();
  }
}

function setLive(state) {
  const el = $('#live');
  el.dataset.live = state;
  el.textContent = state === 'live' ? 'live' : state === 'reconnecting' ? 'reconnecting…' : state;
}

function startEvents() {
  if (S.stopEvents) S.stopEvents();
  S.stopEvents = followEvents(S.lastEventId, onEvent, setLive);
}

// ---------------------------------------------------------------- list

function viewList(main) {
  const filter = h('select', {
    id: 'state-filter',
    onchange: (e) => {
      S.filter = e.target.value;
      sessionStorage.setItem('vman.filter', S.filter);
      renderRows();
    },
  }, h('option', { value: '' }, 'all'), STATES.map((s) => h('option', { value: s }, s)));
  filter.value = S.filter;
  main.append(
    h('div', { class: 'title-row' },
      h('h1', {}, 'Virtual machines'),
      h('a', { class: 'button primary', href: '#/create' }, 'New VM')),
    h('div', { class: 'toolbar' },
      field('State', filter),
      h('span', { id: 'vm-count', class: 'muted', role: 'status' })),
    h('div', { class: 'table-wrap' },
      h('table', { id: 'vm-table', class: 'vms' },
        h('caption', { class: 'sr-only' }, 'Virtual machines, updated live'),
        h('thead', {}, h('tr', {},
          ['Name', 'State', 'Template', 'CPU / RAM', 'IP', 'Ports', 'Uptime', 'Actions'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', { id: 'vm-rows' }))),
    h('p', { id: 'vm-empty', class: 'muted', hidden: true }));
  renderRows();
  performance.mark('vman-rows');
}

function row(vm) {
  const t = vm.vm_template || {};
  return h('tr', { dataset: { vm: vm.id, state: vm.state } },
    h('th', { scope: 'row', 'data-label': 'Name' }, h('a', { href: `#/vm/${seg(vm.id)}`, class: 'vm-link' }, vm.id)),
    h('td', { 'data-label': 'State' }, stateBadge(vm),
      vm.state === 'error' && vm.last_error ? h('div', { class: 'last-error' }, vm.last_error) : null,
      progress(vm.id)),
    h('td', { 'data-label': 'Template' }, t.name || '—'),
    h('td', { 'data-label': 'CPU / RAM' }, `${t.cpu_count} vCPU · ${ramText(t)}`),
    h('td', { 'data-label': 'IP' }, ipOf(vm) || '—'),
    h('td', { 'data-label': 'Ports', class: 'ports' }, portsText(vm)),
    h('td', { 'data-label': 'Uptime' }, uptime(vm)),
    h('td', { 'data-label': 'Actions' }, actionButtons(vm)));
}

function rowSignature(vm) {
  return JSON.stringify([vm, S.busy.get(vm.id) || '', S.starting.has(vm.id) ? S.starting.get(vm.id) || 0 : -1]);
}

function renderRows() {
  const tbody = $('#vm-rows');
  if (!tbody) return;
  const all = [...S.vms.values()];
  const vms = all.filter((v) => !S.filter || v.state === S.filter).sort((a, b) => a.id.localeCompare(b.id));
  const existing = new Map([...tbody.children].map((tr) => [tr.dataset.vm, tr]));
  const wanted = new Set(vms.map((v) => v.id));
  for (const [id, tr] of existing) if (!wanted.has(id)) tr.remove();
  vms.forEach((vm, i) => {
    let tr = existing.get(vm.id);
    const sig = rowSignature(vm);
    if (!tr || tr.dataset.sig !== sig) {
      const fresh = row(vm);
      fresh.dataset.sig = sig;
      if (tr) {
        // Keep the keyboard where it was when the row is redrawn.
        const focused = tr.contains(document.activeElement) ? document.activeElement : null;
        tr.replaceWith(fresh);
        if (focused) {
          const again = focused.dataset.action
            ? fresh.querySelector(`[data-action="${focused.dataset.action}"]`)
            : fresh.querySelector('a');
          (again || fresh.querySelector('button, a')).focus();
        }
      }
      tr = fresh;
    }
    const here = tbody.children[i] || null;
    if (tr !== here) tbody.insertBefore(tr, here);
  });
  const counts = STATES.map((s) => `${all.filter((v) => v.state === s).length} ${s}`).join(', ');
  $('#vm-count').textContent = `${all.length} VMs: ${counts}`;
  const empty = $('#vm-empty');
  empty.hidden = vms.length > 0;
  empty.textContent = all.length === 0 ? 'No VMs yet. Create one with “New VM”.' : 'No VM is in this state.';
}

// -------------------------------------------------------------- create

async function templates() {
  if (!S.templates) S.templates = await api('GET', '/templates');
  return S.templates;
}

function viewCreate(main) {
  const tpl = h('select', { id: 'create-template', required: true });
  const name = h('input', { id: 'create-name', name: 'name', autocomplete: 'off', pattern: '[A-Za-z0-9][A-Za-z0-9._\\-]{0,62}', maxlength: 63, placeholder: 'generated when empty' });
  const boot = h('input', { id: 'create-boot-disk', autocomplete: 'off', placeholder: 'VMAN_DEFAULT_BOOT_DISK when empty' });
  const net = h('select', { id: 'create-network' },
    h('option', { value: '' }, 'server default (VMAN_NETWORK_MODE)'),
    h('option', { value: 'user' }, 'user (rootless, port forwards)'),
    h('option', { value: 'bridge' }, 'bridge (root)'),
    h('option', { value: 'none' }, 'none (no network)'));
  const hostname = h('input', { id: 'create-hostname', autocomplete: 'off' });
  const keys = h('textarea', { id: 'create-ssh-keys', rows: 3, spellcheck: 'false', placeholder: 'ssh-ed25519 AAAA… one key per line' });
  const userData = h('textarea', { id: 'create-user-data', rows: 5, spellcheck: 'false', placeholder: '#cloud-config' });
  const start = h('input', { id: 'create-start', type: 'checkbox' });
  const submit = h('button', { id: 'create-submit', class: 'primary', type: 'submit' }, 'Create');
  const status = h('p', { id: 'create-status', role: 'status' });
  const form = h('form', { id: 'create-form', class: 'card', novalidate: false },
    field('Template', tpl, 'CPUs and memory; templates are made on the Host page or with `vman template create`.'),
    field('Name', name, 'Letters, digits, . _ -; up to 63.'),
    field('Boot disk', boot, 'An image copied as the root disk at the first start (inside VMAN_IMAGE_DIRS).'),
    field('Network', net),
    h('fieldset', {}, h('legend', {}, 'Metadata (cloud-init)'),
      field('Hostname', hostname),
      field('SSH keys', keys),
      field('User data', userData)),
    h('div', { class: 'field check' }, start, h('label', { for: 'create-start' }, 'Start it now')),
    h('div', { class: 'buttons' }, submit),
    status);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = { template_name: tpl.value };
    if (name.value.trim()) body.name = name.value.trim();
    if (boot.value.trim()) body.boot_disk = boot.value.trim();
    if (net.value) body.network = { mode: net.value };
    const meta = {};
    if (hostname.value.trim()) meta.hostname = hostname.value.trim();
    if (keys.value.trim()) meta.ssh_keys = keys.value;
    if (userData.value.trim()) meta.user_data = userData.value;
    submit.disabled = true;
    status.textContent = 'Creating…';
    let vm;
    try {
      vm = await api('POST', '/vms', body);
    } catch (err) {
      status.textContent = '';
      showError('Create', err);
      submit.disabled = false;
      return;
    }
    S.vms.set(vm.id, vm);
    if (Object.keys(meta).length > 0) {
      try {
        await api('PUT', `/vms/${seg(vm.id)}/metadata`, meta);
      } catch (err) {
        showError(`Metadata of ${vm.id} (the VM was created)`, err);
      }
    }
    location.hash = '#/';
    if (start.checked) runAction(vm.id, 'start');
  });
  main.append(h('h1', {}, 'Create a VM'), form);
  templates().then((list) => {
    fill(tpl, ...list.map((t) => h('option', { value: t.name }, `${t.name} (${t.cpu_count} vCPU, ${ramText(t)})`)));
    if (list.length === 0) {
      tpl.append(h('option', { value: '' }, 'no templates yet'));
      status.textContent = 'There is no template yet: add one on the Host page.';
    }
  }).catch((err) => showError('Templates', err));
}

// ------------------------------------------------------------- VM page

function section(id, title, ...children) {
  return h('section', { id, class: 'card', 'aria-labelledby': `${id}-h` }, h('h2', { id: `${id}-h` }, title), ...children);
}

function viewVm(main, id) {
  const status = h('span', { id: 'console-status', role: 'status', dataset: { state: 'closed' } }, 'not connected');
  const box = h('div', { id: 'terminal', class: 'terminal' });
  const reconnect = h('button', { type: 'button', id: 'console-reconnect', onclick: () => S.console && S.console.connect() }, 'Reconnect');
  const copy = h('button', {
    type: 'button', id: 'console-copy',
    onclick: () => S.console && S.console.copy().catch((e) => showError('Copy', e)),
  }, 'Copy');
  const paste = h('button', {
    type: 'button', id: 'console-paste',
    onclick: () => S.console && S.console.paste().then(() => S.console.focus()).catch((e) => showError('Paste', e)),
  }, 'Paste');
  main.append(
    h('p', {}, h('a', { href: '#/' }, '← all VMs')),
    h('h1', {}, h('span', { id: 'vm-name' }, id), ' ', h('span', { id: 'vm-state' })),
    h('div', { id: 'vm-head', class: 'card' }),
    section('console', 'Serial console',
      h('div', { class: 'console-bar' }, status, h('span', { class: 'muted hint' }, 'Ctrl+Shift+C / Ctrl+Shift+V copy and paste'), copy, paste, reconnect),
      box),
    h('div', { class: 'grid' },
      section('disks', 'Data disks', h('div', { id: 'disks-body' }, 'Loading…')),
      section('ports', 'Port forwards', h('div', { id: 'ports-body' })),
      section('metadata', 'Metadata', h('div', { id: 'meta-body' }, 'Loading…')),
      section('snapshots', 'Snapshots', h('div', { id: 'snaps-body' }, 'Loading…'))));
  S.console = openConsole(box, id, (state, why) => {
    status.dataset.state = state;
    status.textContent = state === 'open' ? 'connected' : state === 'connecting' ? 'connecting…' : `closed: ${why}`;
  });
  renderVmPage(id);
  loadDisks(id);
  loadMeta(id);
  loadSnapshots(id);
}

function renderVmPage(id) {
  const head = $('#vm-head');
  if (!head) return;
  const vm = S.vms.get(id);
  if (!vm) {
    fill(head, h('p', { class: 'error-text' }, `There is no VM ${id} (any more).`));
    fill($('#vm-state'), );
    return;
  }
  const sig = rowSignature(vm);
  if (head.dataset.sig === sig) return;
  head.dataset.sig = sig;
  fill($('#vm-state'), stateBadge(vm));
  const t = vm.vm_template || {};
  const rd = vm.root_disk;
  fill(head, 
    actionButtons(vm),
    progress(id) || '',
    vm.last_error ? h('p', { class: 'last-error', id: 'vm-last-error' }, h('strong', {}, 'Last error: '), vm.last_error) : '',
    h('dl', { class: 'facts' }, [
      ['Template', `${t.name} (${t.cpu_count} vCPU, ${ramText(t)})`],
      ['Network', `${vm.network.mode}, MAC ${vm.network.mac}`],
      ['IP', ipOf(vm) || '—'],
      ['Ports', portsText(vm)],
      ['Uptime', uptime(vm)],
      ['Root disk', rd ? `${rd.source}: ${rd.path} (${bytes(rd.virtual_size)})` : 'made at the first start'],
      ['Boot disk', vm.boot_disk || vm.qcow2_path || 'the default boot disk'],
      ['QEMU pid', vm.pid || '—'],
      ['Metadata fetched', when(vm.metadata_fetched_at)],
      ['Created', when(vm.created_at)],
    ].map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])));
  renderPorts(vm);
  if (S.console) {
    if (vm.state === 'running' && !S.console.isOpen()) S.console.connect();
  }
}

function failLine(err) {
  return h('p', { class: 'error-text', role: 'alert' }, errorText(err));
}

async function guarded(what, fn) {
  try {
    return await fn();
  } catch (e) {
    showError(what, e);
    return undefined;
  }
}

function form(id, onsubmit, ...children) {
  const f = h('form', { id, class: 'inline' }, ...children);
  f.addEventListener('submit', async (e) => {
    e.preventDefault();
    const btns = f.querySelectorAll('button');
    btns.forEach((b) => { b.disabled = true; });
    try {
      await onsubmit(f);
    } finally {
      btns.forEach((b) => { b.disabled = false; });
    }
  });
  return f;
}

async function loadDisks(id) {
  const body = $('#disks-body');
  if (!body) return;
  let disks;
  try {
    disks = await api('GET', '/disks');
  } catch (e) {
    fill(body, failLine(e));
    return;
  }
  if (S.view !== `vm:${id}`) return;
  const mine = disks.filter((d) => d.vm_id === id);
  const free = disks.filter((d) => !d.vm_id);
  const rows = mine.map((d) => {
    const size = h('input', { type: 'number', min: 1, value: d.size, id: `disk-size-${d.id}`, 'aria-label': `New size of ${d.id} in GiB`, class: 'short' });
    return h('tr', { dataset: { disk: d.id } },
      h('th', { scope: 'row' }, d.id),
      h('td', {}, `${d.size} GiB`),
      h('td', {}, d.device || '—'),
      h('td', {}, d.state, d.error ? h('div', { class: 'last-error' }, d.error) : null),
      h('td', {}, h('div', { class: 'buttons' },
        size,
        h('button', {
          type: 'button',
          onclick: () => guarded(`Resize ${d.id}`, async () => {
            await api('POST', `/disks/${seg(d.id)}/resize`, { size: Number(size.value) });
            loadDisks(id);
          }),
        }, 'Resize'),
        h('button', {
          type: 'button',
          class: 'danger',
          onclick: async () => {
            if (!(await confirmAction(`Detach ${d.id}?`, `The disk is unplugged from ${id}; its data is kept.`, 'Detach'))) return;
            await guarded(`Detach ${d.id}`, () => api('POST', `/disks/${seg(d.id)}/detach`));
            loadDisks(id);
          },
        }, 'Detach'))));
  });
  const pick = h('select', { id: 'attach-disk' }, free.map((d) => h('option', { value: d.id }, `${d.id} (${d.size} GiB)`)));
  const newSize = h('input', { id: 'new-disk-size', type: 'number', min: 1, value: 1, class: 'short', required: true });
  const newName = h('input', { id: 'new-disk-name', autocomplete: 'off', placeholder: 'generated when empty' });
  fill(body, 
    mine.length === 0 ? h('p', { class: 'muted' }, 'No data disk attached.')
      : h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, ['Disk', 'Size', 'Device', 'State', 'Actions'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, rows))),
    free.length === 0 ? null : form('attach-form', async () => {
      await guarded(`Attach ${pick.value}`, () => api('POST', `/disks/${seg(pick.value)}/attach`, { vm_id: id }));
      loadDisks(id);
    }, field('Free disk', pick), h('button', { type: 'submit' }, 'Attach')),
    form('new-disk-form', async () => {
      await guarded('New disk', async () => {
        const body2 = { size: Number(newSize.value) };
        if (newName.value.trim()) body2.name = newName.value.trim();
        const disk = await api('POST', '/disks', body2);
        await api('POST', `/disks/${seg(disk.id)}/attach`, { vm_id: id });
      });
      loadDisks(id);
    }, field('Size (GiB)', newSize), field('Name', newName), h('button', { type: 'submit' }, 'Create and attach')));
}

function renderPorts(vm) {
  const body = $('#ports-body');
  if (!body) return;
  if (body.dataset.sig === JSON.stringify(vm.network)) return;
  body.dataset.sig = JSON.stringify(vm.network);
  const ports = vm.network.ports || [];
  const guest = h('input', { id: 'port-guest', type: 'number', min: 1, max: 65535, required: true, class: 'short' });
  const host = h('input', { id: 'port-host', type: 'number', min: 1, max: 65535, class: 'short', placeholder: 'any' });
  const proto = h('select', { id: 'port-protocol' }, h('option', { value: 'tcp' }, 'tcp'), h('option', { value: 'udp' }, 'udp'));
  const note = h('p', { class: 'muted', role: 'status', id: 'port-note' });
  if (vm.network.mode !== 'user') {
    fill(body, h('p', { class: 'muted' }, `Port forwards are for user-mode networking; this VM's network is ${vm.network.mode}.`));
    return;
  }
  fill(body, 
    ports.length === 0 ? h('p', { class: 'muted' }, 'No port forward.')
      : h('ul', { class: 'plain' }, ports.map((p) => h('li', {},
        `${p.host_address}:${p.host_port} → guest ${p.guest_port}/${p.protocol} `,
        h('button', {
          type: 'button',
          class: 'danger small',
          'aria-label': `Remove forward of host port ${p.host_port}`,
          onclick: () => guarded(`Remove port ${p.host_port}`, async () => {
            const r = await api('DELETE', `/vms/${seg(vm.id)}/ports/${p.host_port}?protocol=${p.protocol}`);
            note.textContent = r && r.applied === 'next_start' ? 'Removed; takes effect at the next start.' : 'Removed.';
            refreshVm(vm.id);
          }),
        }, 'Remove')))),
    form('port-form', async () => {
      await guarded('Add port forward', async () => {
        const b = { guest_port: Number(guest.value), protocol: proto.value };
        if (host.value) b.host_port = Number(host.value);
        const r = await api('POST', `/vms/${seg(vm.id)}/ports`, b);
        note.textContent = `Host ${r.host_address}:${r.host_port} → guest ${r.guest_port}: ${r.applied === 'now' ? 'applied now' : 'applies at the next start'}.`;
        refreshVm(vm.id);
      });
    }, field('Guest port', guest), field('Host port', host), field('Protocol', proto), h('button', { type: 'submit' }, 'Add')),
    note);
}

async function loadMeta(id) {
  const body = $('#meta-body');
  if (!body) return;
  let m;
  try {
    m = await api('GET', `/vms/${seg(id)}/metadata`);
  } catch (e) {
    fill(body, failLine(e));
    return;
  }
  const hostname = h('input', { id: 'meta-hostname', autocomplete: 'off', value: m.hostname || '' });
  const keys = h('textarea', { id: 'meta-ssh-keys', rows: 3, spellcheck: 'false', value: m.ssh_keys || '' });
  const userData = h('textarea', { id: 'meta-user-data', rows: 5, spellcheck: 'false', value: m.user_data || '' });
  const note = h('p', { class: 'muted', role: 'status' }, m.updated_at ? `Saved ${when(m.updated_at)}` : 'Never set.');
  const f = form('meta-form', async () => {
    const b = {};
    if (hostname.value.trim()) b.hostname = hostname.value.trim();
    if (keys.value.trim()) b.ssh_keys = keys.value;
    if (userData.value.trim()) b.user_data = userData.value;
    await guarded(`Metadata of ${id}`, async () => {
      await api('PUT', `/vms/${seg(id)}/metadata`, b);
      loadMeta(id);
    });
  }, field('Hostname', hostname), field('SSH keys', keys), field('User data', userData),
  h('div', { class: 'buttons' },
    h('button', { type: 'submit', class: 'primary' }, 'Save'),
    h('button', {
      type: 'button',
      class: 'danger',
      onclick: async () => {
        if (!(await confirmAction(`Clear the metadata of ${id}?`, 'Hostname, SSH keys and user data are forgotten.', 'Clear'))) return;
        await guarded(`Clear metadata of ${id}`, () => api('DELETE', `/vms/${seg(id)}/metadata`));
        loadMeta(id);
      },
    }, 'Clear')));
  f.classList.remove('inline');
  fill(body, f, note);
}

async function loadSnapshots(id) {
  const body = $('#snaps-body');
  if (!body) return;
  let list;
  try {
    list = await api('GET', `/vms/${seg(id)}/snapshots`);
  } catch (e) {
    fill(body, failLine(e));
    return;
  }
  if (!Array.isArray(list)) list = (list && list.snapshots) || [];
  const name = h('input', { id: 'snap-name', required: true, autocomplete: 'off', pattern: '[A-Za-z0-9][A-Za-z0-9._\\-]{0,62}' });
  const desc = h('input', { id: 'snap-description', autocomplete: 'off' });
  const act = (s, verb) => async () => {
    const restore = verb === 'restore';
    const ok = await confirmAction(
      restore ? `Restore ${s.name}?` : `Delete snapshot ${s.name}?`,
      restore ? `The root disk of ${id} goes back to the snapshot; what was written since is set aside.` : 'The snapshot file is deleted.',
      restore ? 'Restore' : 'Delete');
    if (!ok) return;
    await guarded(`${restore ? 'Restore' : 'Delete'} ${s.name}`, () => (restore
      ? api('POST', `/vms/${seg(id)}/snapshots/${seg(s.name)}/restore`)
      : api('DELETE', `/vms/${seg(id)}/snapshots/${seg(s.name)}`)));
    loadSnapshots(id);
  };
  fill(body, 
    list.length === 0 ? h('p', { class: 'muted' }, 'No snapshot.')
      : h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, ['Name', 'Taken', 'Size', 'Parent', 'Actions'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, list.map((s) => h('tr', { dataset: { snapshot: s.name } },
          h('th', { scope: 'row' }, s.name, s.description ? h('div', { class: 'muted' }, s.description) : null),
          h('td', {}, when(s.created_at), s.vm_state_at_snapshot ? ` (${s.vm_state_at_snapshot})` : ''),
          h('td', {}, bytes(s.size_bytes)),
          h('td', {}, s.parent || '—'),
          h('td', {}, h('div', { class: 'buttons' },
            h('button', { type: 'button', onclick: act(s, 'restore') }, 'Restore'),
            h('button', { type: 'button', class: 'danger', onclick: act(s, 'delete') }, 'Delete')))))))),
    form('snap-form', async () => {
      await guarded('Snapshot', async () => {
        const b = { name: name.value.trim() };
        if (desc.value.trim()) b.description = desc.value.trim();
        await api('POST', `/vms/${seg(id)}/snapshots`, b);
      });
      loadSnapshots(id);
    }, field('Name', name), field('Description', desc), h('button', { type: 'submit' }, 'Take snapshot')));
}

// ---------------------------------------------------------------- host

function viewHost(main) {
  main.append(
    h('div', { class: 'title-row' }, h('h1', {}, 'Host'),
      h('button', { type: 'button', id: 'host-refresh', onclick: () => { loadHost(); loadTemplates(); } }, 'Refresh')),
    h('div', { class: 'grid' },
      section('health', 'Health', h('div', { id: 'health-body' }, 'Loading…')),
      section('observer', 'Observer', h('div', { id: 'observer-body' }, 'Loading…')),
      section('templates', 'Templates', h('div', { id: 'templates-body' }, 'Loading…'))),
    h('p', { class: 'muted' }, 'API reference: ', h('a', { href: '/docs' }, '/docs'), ' · metrics: ', h('a', { href: '/metrics' }, '/metrics')));
  loadHost();
  loadTemplates();
}

async function loadHost() {
  const hb = $('#health-body');
  const ob = $('#observer-body');
  if (!hb) return;
  try {
    const health = await api('GET', '/health', undefined, { accept: [503] });
    const checks = Object.entries(health.checks || {});
    const mem = health.checks && health.checks.memory && /(\d+) MiB of (\d+) MiB/.exec(health.checks.memory.detail);
    fill(hb, 
      h('p', {}, 'Status: ', h('span', { class: `state state-${health.status === 'ok' ? 'running' : 'error'}`, id: 'health-status' }, health.status),
        health.version ? ` · vman ${health.version}` : ''),
      mem ? h('div', { class: 'field' },
        h('label', { for: 'memory-meter' }, `Memory reserved by running VMs: ${mem[1]} MiB of ${mem[2]} MiB allowed`),
        h('meter', { id: 'memory-meter', min: 0, max: Number(mem[2]), value: Number(mem[1]), high: Number(mem[2]) * 0.9 })) : null,
      h('div', { class: 'table-wrap' }, h('table', { id: 'health-checks' },
        h('thead', {}, h('tr', {}, ['Check', 'OK', 'Detail'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, checks.map(([k, c]) => h('tr', { dataset: { check: k, ok: String(c.ok) } },
          h('th', { scope: 'row' }, k),
          h('td', { class: 'nowrap' }, c.ok ? '✓ yes' : '✗ no'),
          h('td', {}, c.detail)))))));
  } catch (e) {
    fill(hb, failLine(e));
  }
  try {
    const o = await api('GET', '/observer/status');
    fill(ob, 
      h('p', {}, `${o.status}: ${o.passes} passes, one every ${o.check_interval} s; last ${when(o.last_check_at)}`),
      o.last_issues.length === 0 ? h('p', { class: 'muted', id: 'observer-none' }, 'The last pass found nothing wrong.')
        : h('ul', { id: 'observer-issues' }, o.last_issues.map((i) => h('li', {},
          h('strong', {}, i.kind || i.type || 'finding'), ' ',
          Object.entries(i).filter(([k]) => k !== 'kind' && k !== 'type').map(([k, v]) => `${k}: ${typeof v === 'string' ? v : JSON.stringify(v)}`).join(', ')))));
  } catch (e) {
    fill(ob, failLine(e));
  }
}

async function loadTemplates() {
  const body = $('#templates-body');
  if (!body) return;
  S.templates = null;
  let list;
  try {
    list = await templates();
  } catch (e) {
    fill(body, failLine(e));
    return;
  }
  const name = h('input', { id: 'tpl-name', required: true, autocomplete: 'off' });
  const cpu = h('input', { id: 'tpl-cpu', type: 'number', min: 1, value: 1, required: true, class: 'short' });
  const ram = h('input', { id: 'tpl-ram', type: 'number', min: 16, value: 512, required: true, class: 'short' });
  fill(body, 
    list.length === 0 ? h('p', { class: 'muted' }, 'No template.')
      : h('ul', { class: 'plain' }, list.map((t) => h('li', {}, `${t.name}: ${t.cpu_count} vCPU, ${ramText(t)} `,
        h('button', {
          type: 'button',
          class: 'danger small',
          'aria-label': `Delete template ${t.name}`,
          onclick: async () => {
            if (!(await confirmAction(`Delete template ${t.name}?`, 'VMs made from it keep running; new ones cannot use it.', 'Delete'))) return;
            await guarded(`Delete template ${t.name}`, () => api('DELETE', `/templates/${seg(t.name)}`));
            loadTemplates();
          },
        }, 'Delete')))),
    form('template-form', async () => {
      await guarded('New template', () => api('POST', '/templates', { name: name.value.trim(), cpu_count: Number(cpu.value), ram_mib: Number(ram.value) }));
      loadTemplates();
    }, field('Name', name), field('vCPUs', cpu), field('RAM (MiB)', ram), h('button', { type: 'submit' }, 'Add template')));
}

// --------------------------------------------------------------- login

function showLogin(refused) {
  S.authed = false;
  if (S.stopEvents) S.stopEvents();
  S.stopEvents = null;
  if (S.console) S.console.dispose();
  S.console = null;
  S.view = 'login';
  setLive('signed out');
  $('#forget').hidden = true;
  const input = h('input', { id: 'login-token', type: 'password', autocomplete: 'current-password', required: true });
  const error = h('p', { id: 'login-error', class: 'error-text', role: 'alert' },
    refused ? 'The saved token was refused; enter it again.' : '');
  const submit = h('button', { id: 'login-submit', type: 'submit', class: 'primary' }, 'Sign in');
  const f = h('form', { id: 'login-form', class: 'card narrow' },
    h('h1', {}, 'Sign in'),
    h('p', {}, 'This vman needs its API token (VMAN_API_TOKEN). It is kept for this tab only.'),
    field('API token', input),
    h('div', { class: 'buttons' }, submit),
    error);
  f.addEventListener('submit', async (e) => {
    e.preventDefault();
    submit.disabled = true;
    error.textContent = '';
    try {
      await api('GET', '/templates', undefined, { token: input.value });
      saveToken(input.value);
      await boot();
    } catch (err) {
      error.textContent = err.status === 401 ? `Wrong token: ${err.detail}` : errorText(err);
      input.select();
    } finally {
      submit.disabled = false;
    }
  });
  fill($('#main'), f);
  input.focus();
}

// ---------------------------------------------------------------- route

function route() {
  if (!S.authed) return;
  if (S.console) {
    S.console.dispose();
    S.console = null;
  }
  const main = $('#main');
  fill(main);
  clearErrors();
  const hash = location.hash || '#/';
  let nav = 'list';
  if (hash.startsWith('#/vm/')) {
    const id = decodeURIComponent(hash.slice(5));
    S.view = `vm:${id}`;
    nav = '';
    document.title = `${id} · vman`;
    viewVm(main, id);
  } else if (hash === '#/create') {
    S.view = 'create';
    nav = 'create';
    document.title = 'Create a VM · vman';
    viewCreate(main);
  } else if (hash === '#/host') {
    S.view = 'host';
    nav = 'host';
    document.title = 'Host · vman';
    viewHost(main);
  } else {
    S.view = 'list';
    document.title = 'VMs · vman';
    viewList(main);
  }
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === nav) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

async function boot() {
  auth.onUnauthorized = () => showLogin(!!auth.token);
  try {
    // The newest event id first, then the list: the stream resumes after
    // that id, so nothing that happens in between is missed.
    const last = await api('GET', '/events?follow=false&limit=1');
    S.lastEventId = last.reduce((m, e) => Math.max(m, e.id), 0);
    const vms = await api('GET', '/vms');
    S.vms = new Map(vms.map((v) => [v.id, v]));
  } catch (e) {
    if (e.status === 401) return;
    showError('Loading', e);
  }
  S.authed = true;
  clearErrors();
  $('#forget').hidden = !auth.token;
  startEvents();
  route();
}

// Uptimes tick on the page (no request).
setInterval(() => {
  for (const el of document.querySelectorAll('[data-since]')) {
    el.textContent = duration(Date.now() - Date.parse(el.dataset.since));
  }
}, 1000);

// A bug in the page is shown like a refusal, not swallowed.
window.addEventListener('error', (e) => showError('Page error', e.error || e.message));
window.addEventListener('unhandledrejection', (e) => showError('Page error', e.reason));
window.addEventListener('hashchange', route);
window.addEventListener('DOMContentLoaded', () => {
  $('#forget').addEventListener('click', () => {
    forgetToken();
    showLogin(false);
  });
  $('#skip').addEventListener('click', (e) => {
    e.preventDefault();
    $('#main').focus();
  });
  boot();
});
