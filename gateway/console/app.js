// The gateway's operator console: plain JavaScript, no build step, nothing loaded from
// elsewhere. It polls /ui/api/overview and calls the same control-plane operations as the
// `gateway` command line through /ui/api/.
'use strict';

const POLL_MS = 2000;
const state = {
  token: sessionStorage.getItem('gateway-token') || '',
  session: null,
  overview: null,
  selected: location.hash.length > 1 ? decodeURIComponent(location.hash.slice(1)) : null,
  tab: 'models',
  formsKey: null,
  dirty: false,
  timer: null,
  auditTimer: null,
};

const $ = (selector) => document.querySelector(selector);

function esc(value) {
  return String(value === undefined || value === null ? '' : value)
    .replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;').replace(/'/g, '&#39;');
}

function pct(value) {
  if (value === null || value === undefined) return '–';
  return (Math.round(value * 100) / 100) + '%';
}

function num(value, digits) {
  if (value === null || value === undefined) return '–';
  return Number(value).toFixed(digits === undefined ? 1 : digits);
}

function rate(value) {
  if (value === null || value === undefined) return '–';
  return (value * 100).toFixed(value > 0 && value < 0.001 ? 3 : 1) + '%';
}

function when(t) {
  return t ? new Date(t * 1000).toLocaleString() : '';
}

function shares(map) {
  const entries = Object.entries(map || {}).filter(([, p]) => p > 0)
    .sort((a, b) => Number(a[0]) - Number(b[0]));
  return entries.length ? entries.map(([v, p]) => `v${esc(v)}: ${pct(p)}`).join(' · ') : '';
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { Accept: 'application/json' };
  if (state.token) headers.Authorization = 'Bearer ' + state.token;
  const init = { method: options.method || 'GET', headers, cache: 'no-store' };
  if (options.body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(options.body);
  }
  const response = await fetch('api/' + path, init);
  if (options.raw && response.ok) return response;
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    throw new ApiError(response.status, (data && data.error) || `${response.status} ${response.statusText}`);
  }
  return data;
}

function say(text, kind) {
  const box = $('#message');
  box.textContent = text;
  box.className = 'message ' + (kind || '');
}

// ---- session and sign-in -----------------------------------------------------------------

async function loadSession() {
  try {
    state.session = await api('session');
  } catch (e) {
    state.session = null;
    showLogin(e.status === 401 || e.status === 403 ? e.message : 'cannot reach the gateway: ' + e.message);
    return false;
  }
  $('#login').hidden = true;
  const s = state.session;
  const rights = s.can_approve ? 'may change splits, run rollouts and approve'
    : s.can_operate ? 'may change splits and run rollouts' : 'read-only';
  $('#session').innerHTML = `<span id="who">${esc(s.who)}</span> · role <b id="role">${esc(s.role)}</b>` +
    ` (${rights})` + (s.auth ? ' <button id="sign-out" type="button">Sign out</button>' : '');
  const out = $('#sign-out');
  if (out) out.addEventListener('click', () => { sessionStorage.removeItem('gateway-token'); location.reload(); });
  const notice = $('#notice');
  notice.hidden = !s.notice;
  notice.textContent = s.notice || '';
  return true;
}

function showLogin(message) {
  $('#login').hidden = false;
  $('#login-error').textContent = message || '';
  $('#session').textContent = 'not signed in';
}

$('#login').addEventListener('submit', async (event) => {
  event.preventDefault();
  state.token = $('#token-input').value.trim();
  sessionStorage.setItem('gateway-token', state.token);
  if (await loadSession()) { state.formsKey = null; poll(); }
});

// ---- polling -------------------------------------------------------------------------------

async function poll() {
  clearTimeout(state.timer);
  try {
    state.overview = await api('overview');
    const o = state.overview;
    $('#status').textContent = `revision ${o.revision} · ` +
      (o.store_up ? 'state store ok' : 'STATE STORE UNREACHABLE: changes are refused') +
      ` · updated ${new Date().toLocaleTimeString()}`;
    render();
  } catch (e) {
    $('#status').textContent = 'not updated: ' + e.message;
    if (e.status === 401 || e.status === 403) { showLogin(e.message); return; }
  }
  state.timer = setTimeout(poll, document.hidden ? POLL_MS * 3 : POLL_MS);
}

document.addEventListener('visibilitychange', () => { if (!document.hidden) poll(); });

// ---- models ----------------------------------------------------------------------------------

function render() {
  const o = state.overview;
  if (!o) return;
  const filter = $('#filter').value.trim().toLowerCase();
  const models = o.models.filter((m) => !filter || m.name.toLowerCase().includes(filter));
  $('#counts').textContent = `${models.length} of ${o.models.length} models` +
    (o.rate_window_s ? ` · rates over the last ${Math.round(o.rate_window_s)} s` : '');
  const rows = models.map((m) => {
    const ready = m.versions.filter((v) => v.state === 'READY').length;
    let rps = 0; let requests = 0; let errors = 0; let known = false;
    for (const v of m.versions) {
      if (v.rps !== null && v.rps !== undefined) {
        known = true; rps += v.rps; requests += v.requests || 0;
        errors += (v.error_rate || 0) * (v.requests || 0);
      }
    }
    const r = m.rollout;
    const rollout = r ? `<span class="badge ${r.state === 'running' ? 'info' : r.state === 'paused' ? 'warn' : r.state === 'promoted' ? 'ok' : 'bad'}">${esc(r.state.replace('_', ' '))}</span> v${esc(r.to)} ${pct(r.percent)}` : '';
    const shadow = m.shadow ? `v${esc(m.shadow.version)} at ${pct(m.shadow.percent)}` : '';
    return `<tr data-model="${esc(m.name)}" class="${m.name === state.selected ? 'selected' : ''}">` +
      `<td><b>${esc(m.name)}</b></td><td>${ready} ready / ${m.versions.length}</td>` +
      `<td>${shares(m.effective) || '<span class="muted">none</span>'}${Object.keys(m.split || {}).length ? '' : ' <span class="small">(no split)</span>'}</td>` +
      `<td>${shadow}</td><td>${rollout}</td>` +
      `<td class="num">${known ? num(rps, 1) : '–'}</td>` +
      `<td class="num">${known ? rate(requests ? errors / requests : 0) : '–'}</td>` +
      `<td>${m.gated ? '<span class="badge warn">approval required</span>' : ''}</td></tr>`;
  });
  $('#models tbody').innerHTML = rows.join('') || '<tr><td colspan="8" class="muted">no models</td></tr>';
  renderDetail();
  fillAuditModels();
}

$('#models tbody').addEventListener('click', (event) => {
  const row = event.target.closest('tr[data-model]');
  if (!row) return;
  state.selected = row.dataset.model;
  history.replaceState(null, '', '#' + encodeURIComponent(state.selected));
  state.formsKey = null;
  render();
});

$('#filter').addEventListener('input', render);

function selectedModel() {
  if (!state.overview || !state.selected) return null;
  return state.overview.models.find((m) => m.name === state.selected) || null;
}

function renderDetail() {
  const m = selectedModel();
  $('#detail').hidden = !m;
  if (!m) return;
  $('#detail-title').textContent = `Model ${m.name}`;
  const notes = [];
  if (m.gated) notes.push('Approval gate on (gateway.yaml require_approval): a new version gets live traffic only once someone other than its publisher approves it.');
  if (m.held) notes.push(m.held);
  if (m.note) notes.push(m.note);
  if (m.reason) notes.push(m.reason);
  if (m.rollout && (m.rollout.state === 'running' || m.rollout.state === 'paused')) {
    notes.push(`A ${m.rollout.state} rollout owns the split: split changes need "abort the rollout" (force).`);
  }
  $('#detail-notes').innerHTML = notes.map((n) => `<li>${esc(n)}</li>`).join('');
  renderVersions(m);
  renderTraffic(m);
  renderRollout(m);
  const key = JSON.stringify([m.name, m.split, m.shadow, m.versions.map((v) => [v.version, v.state]),
    m.rollout && m.rollout.state, state.session && state.session.role]);
  const active = document.activeElement;
  const focused = active && active.matches('input, select, textarea') &&
    active.closest('#traffic-forms, #rollout-forms');
  if (key !== state.formsKey && !state.dirty && !focused) {
    state.formsKey = key;
    renderForms(m);
  }
}

function lineage(v) {
  const l = v.lineage || {};
  const items = [];
  if (l.created) items.push(`created ${esc(l.created)}`);
  const who = l.published_by || l.publisher;
  if (who) items.push(`publisher ${esc(who)}`);
  if (l.sha256) items.push(`<span title="${esc(l.sha256)}">sha256 ${esc(String(l.sha256).slice(0, 12))}</span>`);
  if (l.source) items.push(`source ${esc(l.source)}`);
  const meta = l.metadata || {};
  for (const [k, value] of Object.entries(meta)) {
    const text = typeof value === 'object' ? JSON.stringify(value) : value;
    items.push(`${esc(k)} = <span title="${esc(text)}">${esc(text)}</span>`);
  }
  if (v.has_baseline) items.push('drift baseline');
  return items.length ? `<ul class="kv">${items.map((i) => `<li>${i}</li>`).join('')}</ul>` : '<span class="muted">no metadata.json</span>';
}

function renderVersions(m) {
  const s = state.session || {};
  const rows = m.versions.slice().reverse().map((v) => {
    const stateBadge = v.state === 'READY' ? '<span class="badge ok">ready</span>'
      : v.state === 'UNAVAILABLE' ? `<span class="badge bad" title="${esc(v.reason)}">unavailable</span><div class="small">${esc(v.reason)}</div>`
        : `<span class="badge">${esc(v.state.toLowerCase().replace('_', ' '))}</span>`;
    let approval = '';
    if (v.approval) {
      approval = `<span class="badge ok" title="${esc(when(v.approval.time))}">approved</span> <span class="small">by ${esc(v.approval.by)}</span>`;
    } else if (m.gated) {
      approval = '<span class="badge warn">not approved</span>' +
        (s.can_approve ? ` <button type="button" class="primary" data-approve="${esc(v.version)}">Approve</button>` : '');
    } else {
      approval = '<span class="muted">not required</span>';
    }
    const drift = (v.drift || []).map((d) => {
      const worst = (d.worst || []).filter((w) => w.score > 0).map((w) => `${esc(w.feature)}: ${num(w.score, 3)}`).join(', ');
      const score = d.score === null || d.score === undefined ? `<span class="muted">${d.source === 'pending' ? 'learning baseline' : 'collecting'}</span>` : num(d.score, 3);
      return `<div class="${d.alert ? 'alert' : ''}">${esc(d.input)}: ${score}` +
        ` <span class="small">/ ${num(d.threshold, 2)}${worst ? ' · ' + worst : ''}</span></div>`;
    }).join('') || '<span class="muted">–</span>';
    const f = v.feedback;
    const feedback = f ? (f.kind === 'regression' ? `MAE ${num(f.score, 4)}` : `accuracy ${rate(f.score)}`) +
      ` <span class="small">(${f.labelled} labels)</span>` : '<span class="muted">–</span>';
    const latency = v.p50_ms !== null && v.p50_ms !== undefined ? `${num(v.p50_ms, 2)} / ${num(v.p99_ms, 2)}`
      : v.mean_ms !== null && v.mean_ms !== undefined ? `mean ${num(v.mean_ms, 2)}` : '–';
    return `<tr data-version="${esc(v.version)}"><td><b>v${esc(v.version)}</b></td><td>${stateBadge}</td>` +
      `<td><meter min="0" max="100" value="${Number(v.traffic) || 0}"></meter> <span class="traffic">${pct(v.traffic)}</span></td>` +
      `<td class="approval">${approval}</td>` +
      `<td class="num">${num(v.rps, 1)}</td><td class="num">${rate(v.error_rate)}</td>` +
      `<td class="num">${latency}</td><td>${drift}</td><td>${feedback}</td><td>${lineage(v)}</td></tr>`;
  });
  $('#versions tbody').innerHTML = rows.join('') || '<tr><td colspan="10" class="muted">no versions</td></tr>';
}

$('#versions tbody').addEventListener('click', (event) => {
  const button = event.target.closest('button[data-approve]');
  if (!button || !state.selected) return;
  act(`models/${encodeURIComponent(state.selected)}/versions/${encodeURIComponent(button.dataset.approve)}/approve`, {});
});

function renderTraffic(m) {
  const split = shares(m.split);
  let html = `<div>Split as set: <b id="split-now">${split || 'none (the newest version serves)'}</b></div>` +
    `<div>Requests get now: <b id="effective-now">${shares(m.effective) || 'no serving version'}</b></div>` +
    `<div>Shadow: <b id="shadow-now">${m.shadow ? `v${esc(m.shadow.version)} gets a copy of ${pct(m.shadow.percent)}` : 'none'}</b></div>`;
  if (m.note) html += `<div class="small">${esc(m.note)}</div>`;
  $('#traffic-now').innerHTML = html;
}

function serving(m) {
  return m.versions.filter((v) => v.state === 'READY').map((v) => v.version);
}

function renderForms(m) {
  state.dirty = false;
  const s = state.session || {};
  if (!s.can_operate) {
    const why = `read-only: the role ${esc(s.role || '?')} cannot change traffic or rollouts`;
    $('#traffic-forms').innerHTML = `<p class="muted" id="read-only">${why}</p>`;
    $('#rollout-forms').innerHTML = `<p class="muted">${why}</p>`;
    return;
  }
  const versions = serving(m);
  const weights = versions.map((v) => `<label>v${esc(v)} <input type="number" min="0" max="100" step="any" ` +
    `data-split-version="${esc(v)}" value="${Number((m.effective || {})[v] || 0)}">%</label>`).join(' ');
  const active = m.rollout && (m.rollout.state === 'running' || m.rollout.state === 'paused');
  const options = versions.map((v) => `<option value="${esc(v)}">v${esc(v)}</option>`).join('');
  $('#traffic-forms').innerHTML =
    `<form id="split-form"><div class="row">${weights || '<span class="muted">no serving version</span>'}</div>` +
    `<div class="row"><label><input type="checkbox" id="split-force"> abort a running rollout (force)</label></div>` +
    `<div class="row"><button type="submit" id="split-apply" class="primary">Apply split</button>` +
    ` <button type="button" id="split-clear">Clear split</button></div></form>` +
    `<form id="shadow-form"><div class="row"><label>Shadow to <select id="shadow-version">${options}</select></label>` +
    ` <label>share <input type="number" id="shadow-percent" min="0" max="100" step="any" value="${m.shadow ? Number(m.shadow.percent) : 5}">%</label></div>` +
    `<div class="row"><button type="submit" id="shadow-set">Set shadow</button>` +
    ` <button type="button" id="shadow-clear"${m.shadow ? '' : ' disabled'}>Remove shadow</button></div></form>`;
  if (m.shadow) $('#shadow-version').value = m.shadow.version;
  const base = `models/${encodeURIComponent(m.name)}/`;
  $('#split-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const weightsSent = {};
    document.querySelectorAll('#split-form input[data-split-version]').forEach((input) => {
      const value = input.value.trim();
      if (value !== '' && Number(value) > 0) weightsSent[input.dataset.splitVersion] = Number(value);
    });
    act(base + 'split', { weights: weightsSent, force: $('#split-force').checked });
  });
  $('#split-clear').addEventListener('click', () => act(base + 'clear', { force: $('#split-force').checked }));
  $('#shadow-form').addEventListener('submit', (event) => {
    event.preventDefault();
    act(base + 'shadow', { version: $('#shadow-version').value, percent: Number($('#shadow-percent').value) });
  });
  $('#shadow-clear').addEventListener('click', () => act(base + 'unshadow', {}));

  let rollout = '';
  if (active) {
    rollout = '<div class="row">' +
      (m.rollout.state === 'running' ? '<button type="button" id="rollout-pause">Pause</button>'
        : '<button type="button" id="rollout-resume" class="primary">Resume</button>') +
      ' <button type="button" id="rollout-abort" class="danger">Abort</button></div>';
  } else {
    const newest = versions.length ? versions[versions.length - 1] : '';
    rollout = `<form id="rollout-form"><div class="row"><label>Canary <select id="rollout-to">${options}</select></label>` +
      ` <label>steps <input id="rollout-steps" value="5,25,50,100" size="12"></label>` +
      ` <label>every <input id="rollout-interval" type="number" min="1" value="60"> s</label></div>` +
      `<div class="row"><button type="submit" id="rollout-start" class="primary"${versions.length > 1 ? '' : ' disabled'}>Start rollout</button>` +
      ' <span class="small">baseline: the version with most traffic now</span></div></form>';
    $('#rollout-forms').innerHTML = rollout;
    if (newest) $('#rollout-to').value = newest;
    $('#rollout-form').addEventListener('submit', (event) => {
      event.preventDefault();
      act(base + 'rollout', { to: $('#rollout-to').value, steps: $('#rollout-steps').value,
        interval: Number($('#rollout-interval').value) });
    });
    markDirty();
    return;
  }
  $('#rollout-forms').innerHTML = rollout;
  const pause = $('#rollout-pause');
  if (pause) pause.addEventListener('click', () => act(base + 'rollout/pause', {}));
  const resume = $('#rollout-resume');
  if (resume) resume.addEventListener('click', () => act(base + 'rollout/resume', {}));
  const abort = $('#rollout-abort');
  abort.addEventListener('click', () => {
    if (abort.dataset.armed) { act(base + 'rollout/abort', {}); return; }
    abort.dataset.armed = '1';
    abort.textContent = 'Click again to abort';
    setTimeout(() => { delete abort.dataset.armed; abort.textContent = 'Abort'; }, 4000);
  });
  markDirty();
}

function markDirty() {
  document.querySelectorAll('#traffic-forms input, #traffic-forms select, #rollout-forms input, #rollout-forms select')
    .forEach((el) => el.addEventListener('input', () => { state.dirty = true; }));
}

function renderRollout(m) {
  const r = m.rollout;
  if (!r) { $('#rollout-now').innerHTML = '<p class="muted">no rollout</p>'; return; }
  const steps = r.steps.map((s, i) => (i === r.step ? `<b>${s}</b>` : s)).join(' → ');
  const figure = (w) => (w ? `<td class="num">${w.requests}</td><td class="num">${w.errors}</td><td class="num">${rate(w.error_rate)}</td><td class="num">${num(w.p99_ms, 2)}</td><td class="num">${w.replicas}</td>` : '<td colspan="5" class="muted">–</td>');
  const history = r.history.slice().reverse().map((h) => `<li>${esc(when(h.time))} <b>${esc(h.event)}</b> ${pct(h.percent)} ${esc(h.detail)} <span class="small">(${esc(h.who)})</span></li>`).join('');
  $('#rollout-now').innerHTML =
    `<div id="rollout-state">Rollout to <b>v${esc(r.to)}</b> (baseline v${esc(r.from)}) is <b>${esc(r.state.replace('_', ' '))}</b>: canary at <b>${pct(r.percent)}</b></div>` +
    `<div>Step ${r.step + 1} of ${r.steps.length}: ${steps}` +
    (r.step_remaining_s !== null && r.step_remaining_s !== undefined ? ` · next decision in ${Math.round(r.step_remaining_s)} s (every ${r.interval_s} s)` : '') + '</div>' +
    `<table class="figures"><tr><th></th><th>requests</th><th>errors</th><th>error rate</th><th>p99 ms</th><th>replicas</th></tr>` +
    `<tr><th>canary v${esc(r.to)}</th>${figure(r.canary)}</tr><tr><th>baseline v${esc(r.from)}</th>${figure(r.baseline)}</tr></table>` +
    `<div class="small">limits: error rate ≤ ${rate(r.max_error_rate)}, p99 ≤ ${r.max_latency_ratio}× baseline, ${r.min_requests} canary requests per step</div>` +
    (r.reason ? `<div>reason: ${esc(r.reason)}</div>` : '') +
    `<ul class="history">${history}</ul>`;
}

async function act(path, body) {
  say('working…', '');
  try {
    const result = await api(path, { method: 'POST', body });
    say(result.message || 'done', 'ok');
    state.formsKey = null;
    state.dirty = false;
  } catch (e) {
    say(`refused (${e.status}): ${e.message}`, 'error');
  }
  await poll();
  if (state.tab === 'audit') loadAudit();
}

// ---- audit trail ------------------------------------------------------------------------------

function auditQuery(format) {
  const params = new URLSearchParams();
  const add = (key, id) => { const v = $(id).value.trim(); if (v) params.set(key, v); };
  add('model', '#audit-model');
  add('who', '#audit-who');
  add('action', '#audit-action');
  add('text', '#audit-text');
  params.set('limit', $('#audit-limit').value);
  if (format) params.set('format', format);
  return 'audit?' + params.toString();
}

async function loadAudit() {
  clearTimeout(state.auditTimer);
  try {
    const data = await api(auditQuery());
    const rows = data.records.slice().reverse().map((r) => `<tr><td>${esc(when(r.time))}</td>` +
      `<td class="num">${esc(r.revision)}</td><td class="who">${esc(r.who)}</td><td>${esc(r.model)}</td>` +
      `<td class="action">${esc(r.action)}</td>` +
      `<td class="summary" title="${esc(JSON.stringify(r.old))} → ${esc(JSON.stringify(r.new))}">${esc(r.summary)}</td></tr>`);
    $('#audit tbody').innerHTML = rows.join('') || '<tr><td colspan="6" class="muted">no records</td></tr>';
    $('#audit-count').textContent = `${data.records.length} records`;
  } catch (e) {
    $('#audit-count').textContent = 'not loaded: ' + e.message;
  }
  if (state.tab === 'audit') state.auditTimer = setTimeout(loadAudit, POLL_MS * 2);
}

function fillAuditModels() {
  const select = $('#audit-model');
  const names = state.overview.models.map((m) => m.name);
  const have = Array.from(select.options).slice(1).map((o) => o.value);
  if (JSON.stringify(have) === JSON.stringify(names)) return;
  const current = select.value;
  select.innerHTML = '<option value="">all</option>' + names.map((n) => `<option value="${esc(n)}">${esc(n)}</option>`).join('');
  select.value = names.includes(current) ? current : '';
}

let auditDebounce = null;
$('#audit-filters').addEventListener('input', () => {
  clearTimeout(auditDebounce);
  auditDebounce = setTimeout(loadAudit, 250);
});
$('#audit-filters').addEventListener('submit', (event) => { event.preventDefault(); loadAudit(); });

async function download(format) {
  try {
    const response = await api(auditQuery(format), { raw: true });
    const blob = await response.blob();
    const link = document.createElement('a');
    link.href = URL.createObjectURL(blob);
    link.download = `gateway-audit.${format}`;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    say(`audit trail exported as ${format.toUpperCase()}`, 'ok');
  } catch (e) {
    say(`export refused (${e.status}): ${e.message}`, 'error');
  }
}
$('#export-csv').addEventListener('click', () => download('csv'));
$('#export-jsonl').addEventListener('click', () => download('jsonl'));

// ---- tabs and start ---------------------------------------------------------------------------

document.querySelectorAll('.tab').forEach((tab) => tab.addEventListener('click', () => {
  state.tab = tab.dataset.tab;
  document.querySelectorAll('.tab').forEach((t) => t.classList.toggle('active', t === tab));
  $('#view-models').hidden = state.tab !== 'models';
  $('#view-audit').hidden = state.tab !== 'audit';
  if (state.tab === 'audit') loadAudit(); else clearTimeout(state.auditTimer);
}));

(async () => {
  if (await loadSession()) poll();
})();
