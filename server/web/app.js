// The vqret search page: one plain script, no build step, nothing loaded from elsewhere.
// It only talks to this server's own JSON API (api/stores, api/search).
'use strict';

const $ = (id) => document.getElementById(id);
const form = $('search'), input = $('q'), fileInput = $('file'), storeSelect = $('store');
const kSelect = $('k'), statusBox = $('status'), grid = $('grid'), drop = $('drop');
const viewer = $('viewer');
let latest = 0; // answers to older requests are dropped, so fast typing can't reorder results
let viewing = null; // the result shown in the viewer
let previewUrl = null; // object URL of the query image on show, freed when replaced

function setStatus(text, isError = false, preview = null) {
  statusBox.replaceChildren();
  statusBox.classList.toggle('error', isError);
  if (preview) {
    const img = document.createElement('img');
    img.alt = '';
    img.addEventListener('error', () => img.remove()); // the "image" was not one
    img.src = preview;
    statusBox.append(img);
  }
  statusBox.append(document.createTextNode(text));
}

async function loadStores() {
  const answer = await fetch('api/stores');
  const stores = await answer.json();
  for (const s of stores) {
    const option = new Option(`${s.name} (${s.images} images)`, s.name);
    storeSelect.append(option);
  }
  storeSelect.hidden = stores.length < 2;
  const wanted = new URLSearchParams(location.search).get('store');
  if (wanted && stores.some((s) => s.name === wanted)) storeSelect.value = wanted;
}

// Each card shows when the picture was taken and with what (the rows' columns).
const CARD_COLUMNS = ['taken', 'camera'];

// kind: 'text' | 'image' | 'like'; value: the text, a File/Blob, or an id.
async function search(kind, value, label) {
  const ticket = ++latest;
  const k = Number(kSelect.value);
  const store = storeSelect.value || undefined;
  const filters = currentFilters();
  let request;
  if (kind === 'image') {
    const body = new FormData();
    body.append('image', value, value.name || 'query.png');
    body.append('k', String(k));
    if (store) body.append('store', store);
    if (filters) body.append('filters', JSON.stringify(filters));
    body.append('columns', CARD_COLUMNS.join(','));
    request = { method: 'POST', body };
  } else {
    // text goes as q: the query syntax ("cat - grass + 0.5:dog"), read by the server
    const query = kind === 'text' ? { q: value } : { like: value };
    request = {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...query, k, store, filters, columns: CARD_COLUMNS }),
    };
  }
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  const preview = previewUrl = kind === 'image' ? URL.createObjectURL(value) : null;
  setStatus(`Searching ${label}…`, false, preview);
  grid.setAttribute('aria-busy', 'true');
  remember(kind, value, store);
  let answer, data;
  try {
    answer = await fetch('api/search', request);
    data = await answer.json();
  } catch (err) {
    if (ticket === latest) {
      grid.removeAttribute('aria-busy');
      setStatus(`Search failed: ${err.message}`, true);
    }
    return;
  }
  if (ticket !== latest) return;
  grid.removeAttribute('aria-busy');
  if (!answer.ok) {
    grid.replaceChildren(); // no stale results under an error
    setStatus(data.error || `Search failed (HTTP ${answer.status})`, true, preview);
    return;
  }
  render(data.results, data.generated);
  const n = data.results.length;
  const within = data.query && data.query.filters ? ' · filtered' : '';
  // a note beside results only when rows are missing (damaged parts): the rest explain an
  // empty answer
  const note = data.note && (!n || data.note.includes('unavailable')) ? ` · ${data.note}` : '';
  setStatus(`${n} result${n === 1 ? '' : 's'} for ${label} in ${Math.round(data.took_ms)} ms`
    + readAs(data.query) + within + note
    + (data.generated ? ' · nothing matched well, so one was drawn' : ''), false, preview);
}

// How the server read a query of several terms: "read as + “cat” − “grass” × 0.5".
function readAs(query) {
  const terms = (query && query.terms) || [];
  if (terms.length < 2 && !(terms[0] && terms[0].weight !== 1)) return '';
  const parts = terms.map((t, i) => {
    const sign = t.weight < 0 ? '−' : (i ? '+' : '');
    const weight = Math.abs(t.weight) === 1 ? '' : ` × ${Math.abs(t.weight)}`;
    const what = t.type === 'text' ? `“${t.text}”` : t.type === 'like' ? `image #${t.id}`
      : t.type === 'image_url' ? t.url : 'an image';
    return `${sign} ${what}${weight}`.trim();
  });
  return ` · read as ${parts.join(' ')}`;
}

// The fallback's picture: a card like the others, marked "generated", first.
function generatedCard(g) {
  const card = $('card').content.firstElementChild.cloneNode(true);
  card.classList.add('generated');
  card.dataset.generated = 'true';
  const img = card.querySelector('img');
  img.src = g.url;
  img.alt = `generated for ${g.prompt}`;
  card.querySelector('.score').textContent = g.clip_score.toFixed(3);
  card.querySelector('.score').title = 'CLIP score of the generated picture';
  card.querySelector('.like').remove();
  const path = card.querySelector('.path');
  path.textContent = 'generated';
  const best = g.best_score === null ? 'no result' : g.best_score.toFixed(3);
  path.title = `drawn because the best score ${best} is below ${g.threshold.toFixed(3)}`
    + ` (seed ${g.seed})`;
  card.querySelector('.thumb').addEventListener('click', () => window.open(g.url, '_blank'));
  return card;
}

function render(results, generated) {
  const template = $('card').content.firstElementChild;
  const cards = results.map((r) => {
    const card = template.cloneNode(true);
    card.dataset.id = r.id;
    card.dataset.rank = r.rank;
    const img = card.querySelector('img');
    img.src = r.thumbnail_url;
    img.alt = r.path;
    card.querySelector('.score').textContent = r.score.toFixed(3);
    const path = card.querySelector('.path');
    path.textContent = r.path.split('/').pop() + moment(r);
    path.title = r.path;
    const facts = [r.taken ? r.taken.slice(0, 10) : '', r.camera || ''].filter(Boolean);
    card.querySelector('.facts').textContent = facts.join(' · ');
    card.querySelector('.thumb').addEventListener('click', () => show(r));
    card.querySelector('.like').addEventListener('click', () => likeThis(r));
    return card;
  });
  if (generated) cards.unshift(generatedCard(generated));
  grid.replaceChildren(...cards);
  window.scrollTo(0, 0);
}

// A video's moment as players show it: " @ 01:23" (t in seconds); "" for an image.
function moment(r) {
  if (r.t === undefined || r.t === null) return '';
  const s = Math.floor(r.t);
  const mm = String(Math.floor((s % 3600) / 60)).padStart(2, '0');
  const ss = String(s % 60).padStart(2, '0');
  return s >= 3600 ? ` @ ${Math.floor(s / 3600)}:${mm}:${ss}` : ` @ ${mm}:${ss}`;
}

function show(r) {
  viewing = r;
  const isVideo = r.t !== undefined && r.t !== null;
  const video = $('full-video');
  $('full').hidden = isVideo;
  video.hidden = !isVideo;
  if (isVideo) {
    // a media fragment: the browser seeks there (range requests), then plays
    video.src = `${r.original_url}#t=${r.t}`;
    video.play().catch(() => {}); // autoplay refused: the controls are there
    $('full').removeAttribute('src');
  } else {
    video.pause();
    video.removeAttribute('src');
    $('full').src = r.original_url;
  }
  $('full').alt = r.path;
  $('caption').textContent = `${r.path}${moment(r)} · ${r.score.toFixed(3)}`;
  $('open').href = isVideo ? `${r.original_url}#t=${r.t}` : r.original_url;
  viewer.showModal();
}

function likeThis(r) {
  if (viewer.open) viewer.close();
  input.value = '';
  search('like', r.id, `images like ${r.path.split('/').pop()}`);
}

// The filter bar: only the fields filled in are sent, as {"filters": {...}}.
const filterInputs = { in: $('f-in'), after: $('f-after'), before: $('f-before'),
  type: $('f-type'), camera: $('f-camera') };
function currentFilters() {
  const out = {};
  for (const [name, el] of Object.entries(filterInputs)) {
    if (el.value.trim()) out[name] = el.value.trim();
  }
  return Object.keys(out).length ? out : undefined;
}
function filtersChanged() {
  if (input.value.trim()) form.requestSubmit();
}
for (const el of Object.values(filterInputs)) el.addEventListener('change', filtersChanged);
$('f-clear').addEventListener('click', () => {
  for (const el of Object.values(filterInputs)) el.value = '';
  filtersChanged();
});
$('filters').addEventListener('submit', (event) => { event.preventDefault(); filtersChanged(); });

function remember(kind, value, store) {
  // The address bar keeps text and "like" searches so they can be reloaded or shared.
  const params = new URLSearchParams();
  if (kind === 'text') params.set('q', value);
  if (kind === 'like') params.set('like', value);
  if (store && storeSelect.options.length > 1) params.set('store', store);
  for (const [name, el] of Object.entries(filterInputs)) {
    if (el.value.trim()) params.set(name, el.value.trim());
  }
  const query = params.toString();
  history.replaceState(null, '', query ? `?${query}` : location.pathname);
}

function searchFile(file) {
  if (!file || !file.type.startsWith('image/')) {
    setStatus('That is not an image file.', true);
    return;
  }
  input.value = '';
  search('image', file, `images like ${file.name || 'the pasted image'}`);
}

form.addEventListener('submit', (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text) {
    setStatus('Type something to search for, or drop an image.', true);
    return;
  }
  search('text', text, `“${text}”`);
});
fileInput.addEventListener('change', () => {
  searchFile(fileInput.files[0]);
  fileInput.value = '';
});
kSelect.addEventListener('change', () => input.value.trim() && form.requestSubmit());
storeSelect.addEventListener('change', () => input.value.trim() && form.requestSubmit());

// Drag and drop anywhere on the page; paste an image from the clipboard.
let dragDepth = 0;
const hasFiles = (event) => [...(event.dataTransfer?.types || [])].includes('Files');
document.addEventListener('dragenter', (event) => {
  if (!hasFiles(event)) return;
  dragDepth++;
  drop.hidden = false;
});
document.addEventListener('dragleave', () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) drop.hidden = true;
});
document.addEventListener('dragover', (event) => {
  if (hasFiles(event)) event.preventDefault();
});
document.addEventListener('drop', (event) => {
  event.preventDefault();
  dragDepth = 0;
  drop.hidden = true;
  searchFile(event.dataTransfer.files[0]);
});
document.addEventListener('paste', (event) => {
  const item = [...(event.clipboardData?.items || [])].find((i) => i.type.startsWith('image/'));
  if (item) searchFile(item.getAsFile());
});

$('close').addEventListener('click', () => viewer.close());
viewer.addEventListener('close', () => $('full-video').pause()); // no sound from a closed viewer
$('viewer-like').addEventListener('click', () => viewing && likeThis(viewing));
viewer.addEventListener('click', (event) => {
  if (event.target === viewer) viewer.close(); // a click on the backdrop
});

loadStores().then(() => {
  const params = new URLSearchParams(location.search);
  for (const [name, el] of Object.entries(filterInputs)) {
    if (params.get(name)) el.value = params.get(name);
  }
  if (params.get('q')) {
    input.value = params.get('q');
    form.requestSubmit();
  } else if (params.get('like') && /^\d+$/.test(params.get('like'))) {
    search('like', Number(params.get('like')), `images like #${params.get('like')}`);
  }
}).catch((err) => setStatus(`Can't reach the server: ${err.message}`, true));
