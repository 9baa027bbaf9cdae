/* Dashboard pages: data arrives as scripts calling DASH.put(name, data) (file:// forbids fetch). */
(function () {
  'use strict';
  var DASH = window.DASH = {data: {}, waiting: {}};
  DASH.put = function (name, value) { DASH.data[name] = value; };
  DASH.load = function (name, src) {
    if (DASH.data[name]) return Promise.resolve(DASH.data[name]);
    if (DASH.waiting[name]) return DASH.waiting[name];
    DASH.waiting[name] = new Promise(function (resolve, reject) {
      var s = document.createElement('script');
      s.src = src;
      s.onload = function () { DASH.data[name] ? resolve(DASH.data[name]) : reject(new Error('no data in ' + src)); };
      s.onerror = function () { delete DASH.waiting[name]; reject(new Error('cannot load ' + src)); };
      document.head.appendChild(s);
    });
    return DASH.waiting[name];
  };
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function $(id) { return document.getElementById(id); }
  function fmt(v) { return v === 0 ? '0' : Math.abs(v) >= 1e-3 ? (+v.toPrecision(4)).toString() : v.toExponential(2); }
  function pct(v) { return (100 * v).toPrecision(3) + '%'; }
  function shown(t) { return /^\s*$/.test(t) ? JSON.stringify(t) : visible(t); }
  function visible(t) { return t.replace(/\n/g, '\u21b5').replace(/\t/g, '\u2192').replace(/\r/g, ''); }
  var SVG = 'http://www.w3.org/2000/svg';
  function bars(counts, opts) {
    var w = opts.width || 420, h = opts.height || 110, n = counts.length, mx = Math.max.apply(null, counts.concat([1]));
    var svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('width', w); svg.setAttribute('height', h + 18);
    counts.forEach(function (c, i) {
      var r = document.createElementNS(SVG, 'rect'), bh = opts.log ? (c ? Math.log1p(c) / Math.log1p(mx) : 0) * h : c / mx * h;
      r.setAttribute('x', i * w / n); r.setAttribute('width', Math.max(w / n - 1, 1));
      r.setAttribute('y', h - bh); r.setAttribute('height', bh);
      r.setAttribute('fill', opts.color ? opts.color(i) : '#4a78b0');
      var t = document.createElementNS(SVG, 'title'); t.textContent = (opts.label ? opts.label(i) : i) + ': ' + c; r.appendChild(t);
      svg.appendChild(r);
    });
    (opts.ticks || []).forEach(function (tk) {
      var x = tk[0] * w, tx = document.createElementNS(SVG, 'text');
      tx.setAttribute('x', Math.min(Math.max(x, 2), w - 30)); tx.setAttribute('y', h + 14); tx.setAttribute('font-size', '10');
      tx.textContent = tk[1]; svg.appendChild(tx);
    });
    return svg;
  }
  function exactNote(x) {
    if (x.exact) return 'Frequencies are exact: no position had more active features than the ' + x.recorded_k + ' recorded.';
    return x.truncated + ' positions had more active features than the ' + x.recorded_k + ' recorded (up to ' + x.max_l0 +
      '): frequencies count top-' + x.recorded_k + ' membership and are lower bounds; extract with --top-k ' + x.max_l0 + ' for exact counts, or count chosen features exactly with `sparse-clt-hf stats DIR --exact L/F`.';
  }
  function meta() { return DASH.load('meta', 'data/meta.js'); }
  function layerIndex(layer) { return DASH.load('L' + layer, 'data/L' + layer + '/index.js'); }

  /* ---------------------------------------------------------------- index page */
  var state = {key: 'freq', asc: false, limit: 200};
  function renderIndex(m) {
    var layers = m.layers.map(function (l) { return l.layer; });
    var want = /^#L(-?\d+)/.exec(location.hash), layer = want ? +want[1] : layers[0];
    if (layers.indexOf(layer) < 0) layer = layers[0];
    var L = m.layers[layers.indexOf(layer)];
    $('title').textContent = m.title;
    var nav = $('layers'); nav.textContent = '';
    layers.forEach(function (l) { var a = el('a', {href: '#L' + l}, 'L' + l); if (l === layer) a.className = 'on'; nav.appendChild(a); });
    layerIndex(layer).then(function (d) {
      var s = $('summary'); s.textContent = '';
      s.appendChild(el('p', {}, 'Layer ' + layer + ': ' + L.alive + ' of ' + L.n_features + ' features fired over ' +
        m.n_positions + ' positions. '));
      s.appendChild(el('p', {'class': 'note', id: 'exact'}, exactNote(L.exact)));
      var dn = $('density'); dn.textContent = ''; dn.appendChild(el('h2', {}, 'Feature density (log10 frequency; ' + L.density.dead + ' never fired)'));
      var e = L.density.edges;
      dn.appendChild(bars(L.density.counts, {width: 480, height: 90, label: function (i) { return '10^' + e[i].toFixed(2) + '..10^' + e[i + 1].toFixed(2); },
        ticks: [[0, '1e' + e[0]], [0.5, '1e' + ((e[0] + e[e.length - 1]) / 2).toFixed(1)], [0.93, '1']]}));
      renderTable(m, layer, d);
    });
  }
  function renderTable(m, layer, d) {
    var q = $('search').value.trim().toLowerCase(), n = d.count.length, rows = [];
    /* "#942": that feature; "freq>0.01", "max<2", "mean>=1": a numeric filter; else a label substring */
    var num = /^(freq|max|mean)\s*(<=|>=|<|>|=)\s*([-+0-9.e]+)$/.exec(q), field = null;
    if (num) field = {freq: function (i) { return d.count[i] / Math.max(m.n_positions, 1); },
      max: function (i) { return d.max[i]; }, mean: function (i) { return d.mean[i]; }}[num[1]];
    var cmp = num && {'<': function (a, b) { return a < b; }, '>': function (a, b) { return a > b; }, '<=': function (a, b) { return a <= b; },
      '>=': function (a, b) { return a >= b; }, '=': function (a, b) { return a === b; }}[num[2]];
    for (var i = 0; i < n; i++) {
      if (q) {
        if (num) { if (!cmp(field(i), +num[3])) continue; }
        else if (q[0] === '#') { if (String(i) !== q.slice(1)) continue; }
        else if (d.label[i].toLowerCase().indexOf(q) < 0) continue;
      }
      rows.push(i);
    }
    var val = {id: function (i) { return i; }, label: function (i) { return d.label[i]; }, freq: function (i) { return d.count[i]; },
      max: function (i) { return d.max[i]; }, mean: function (i) { return d.mean[i]; }}[state.key];
    rows.sort(function (a, b) { var x = val(a), y = val(b); var c = x < y ? -1 : x > y ? 1 : a - b; return state.asc ? c : -c; });
    document.querySelectorAll('th').forEach(function (th) {
      th.className = th.dataset.key === state.key ? 'sorted' + (state.asc ? ' asc' : '') : '';
    });
    var tb = document.querySelector('#features tbody'); tb.textContent = '';
    rows.slice(0, state.limit).forEach(function (i) {
      var tr = el('tr', {'data-feature': i});
      var td = el('td'); td.appendChild(el('a', {href: 'feature.html#L' + layer + '/' + i}, 'L' + layer + '/' + i)); tr.appendChild(td);
      tr.appendChild(el('td', {}, d.label[i]));
      tr.appendChild(el('td', {'class': 'num'}, pct(d.count[i] / Math.max(m.n_positions, 1))));
      tr.appendChild(el('td', {'class': 'num'}, fmt(d.max[i])));
      tr.appendChild(el('td', {'class': 'num'}, fmt(d.mean[i])));
      tb.appendChild(tr);
    });
    $('shown').textContent = Math.min(rows.length, state.limit) + ' of ' + rows.length + ' features shown';
    $('more').hidden = rows.length <= state.limit;
  }
  function hashOptions() {  /* index.html#L6&sort=max&asc=1&q=text: a linkable sorted or filtered view */
    var o = {};
    location.hash.replace(/^#/, '').split('&').slice(1).forEach(function (kv) {
      var i = kv.indexOf('='); if (i > 0) o[kv.slice(0, i)] = decodeURIComponent(kv.slice(i + 1));
    });
    return o;
  }
  function startIndex() {
    var o = hashOptions();
    if (o.sort && ['id', 'label', 'freq', 'max', 'mean'].indexOf(o.sort) >= 0) { state.key = o.sort; state.asc = o.asc === '1'; }
    if (o.q) $('search').value = o.q;
    meta().then(function (m) {
      var redraw = function () { layerIndex(currentLayer(m)).then(function (d) { renderTable(m, currentLayer(m), d); }); };
      document.querySelectorAll('th').forEach(function (th) {
        th.addEventListener('click', function () {
          if (state.key === th.dataset.key) state.asc = !state.asc; else { state.key = th.dataset.key; state.asc = th.dataset.key === 'id' || th.dataset.key === 'label'; }
          redraw();
        });
      });
      $('search').addEventListener('input', function () { state.limit = 200; redraw(); });
      $('more').addEventListener('click', function () { state.limit += 1000; redraw(); });
      window.addEventListener('hashchange', function () { renderIndex(m); });
      renderIndex(m);
    }).catch(fail);
  }
  function currentLayer(m) {
    var want = /^#L(-?\d+)/.exec(location.hash), layers = m.layers.map(function (l) { return l.layer; });
    return want && layers.indexOf(+want[1]) >= 0 ? +want[1] : layers[0];
  }

  /* ---------------------------------------------------------------- feature page */
  function renderFeature(m) {
    var want = /^#L(-?\d+)\/(\d+)/.exec(location.hash);
    if (!want) return fail(new Error('no feature in the address: use feature.html#L<layer>/<feature>'));
    var layer = +want[1], f = +want[2], li = m.layers.map(function (l) { return l.layer; }).indexOf(layer);
    if (li < 0) return fail(new Error('layer ' + layer + ' is not in this site'));
    var L = m.layers[li];
    if (f >= L.n_features) return fail(new Error('feature ' + f + ' out of range: layer ' + layer + ' has ' + L.n_features));
    var c = Math.floor(f / L.chunk), name = 'L' + layer + '/c' + c;
    Promise.all([layerIndex(layer), DASH.load(name, 'data/L' + layer + '/c' + c + '.js')]).then(function (r) {
      var d = r[0], chunk = r[1], rec = chunk.features[String(f)], vocab = chunk.vocab;
      var tok = function (id) { return id in vocab ? vocab[id] : '#' + id; };
      document.title = 'L' + layer + '/' + f + ' ' + d.label[f];
      $('title').textContent = 'L' + layer + '/' + f + (d.label[f] ? '  ' + d.label[f] : '');
      $('back').setAttribute('href', 'index.html#L' + layer);
      var nav = $('nav'); nav.textContent = '';
      if (f > 0) nav.appendChild(el('a', {href: '#L' + layer + '/' + (f - 1)}, '\u2190 prev'));
      nav.appendChild(document.createTextNode(' '));
      if (f + 1 < L.n_features) nav.appendChild(el('a', {href: '#L' + layer + '/' + (f + 1)}, 'next \u2192'));
      var s = $('summary'); s.textContent = '';
      s.appendChild(el('p', {id: 'freq'}, 'frequency ' + pct(d.count[f] / Math.max(m.n_positions, 1)) + ' (' + d.count[f] + ' of ' +
        m.n_positions + ' positions), max ' + fmt(d.max[f]) + ', mean ' + fmt(d.mean[f])));
      var ec = (L.exact_counts || {})[String(f)];
      if (ec) s.appendChild(el('p', {id: 'exactfreq'}, 'exact frequency ' + pct(ec[0] / Math.max(ec[2], 1)) + ' (' + ec[0] +
        ' of ' + ec[2] + ' positions, by dense encoding; the recorded top-k saw ' + ec[1] + ')'));
      s.appendChild(el('p', {'class': 'note', id: 'exact'}, exactNote(L.exact)));
      var mx = d.max[f] || 1, w = rec.w || 1, h = $('histogram');
      h.querySelectorAll('svg,p').forEach(function (x) { x.remove(); });
      var groupOf = function (i) { for (var g = 0; g < rec.g.length; g++) if (i < rec.g[g][3]) return g; return rec.g.length - 1; };
      var colors = ['#9ecae1', '#6baed6', '#4292c6', '#2171b5', '#08519c', '#08306b'];
      h.appendChild(bars(rec.h, {label: function (i) { return fmt(i * w) + '..' + fmt((i + 1) * w); },
        color: function (i) { return colors[groupOf(i) % colors.length]; }, ticks: [[0, '0'], [0.92, fmt(rec.h.length * w)]]}));
      h.appendChild(el('p', {'class': 'note'}, rec.n + ' recorded activations in bins of width ' + fmt(w) + ' up to the max; shades: quantile groups'));
      var lg = $('logits'); lg.querySelectorAll('table,p').forEach(function (x) { x.remove(); });
      if (rec.lt) {
        var t = el('table', {'class': 'logit'});
        var hr = el('tr'); hr.appendChild(el('th', {}, 'raises')); hr.appendChild(el('th', {}, '')); hr.appendChild(el('th', {}, 'lowers')); hr.appendChild(el('th', {}, '')); t.appendChild(hr);
        for (var i = 0; i < rec.lt.length; i++) {
          var tr = el('tr');
          tr.appendChild(el('td', {'class': 'pos'}, shown(tok(rec.lt[i][0])))); tr.appendChild(el('td', {'class': 'num'}, fmt(rec.lt[i][1])));
          tr.appendChild(el('td', {'class': 'neg'}, shown(tok(rec.lb[i][0])))); tr.appendChild(el('td', {'class': 'num'}, fmt(rec.lb[i][1])));
          t.appendChild(tr);
        }
        lg.appendChild(t);
        lg.appendChild(el('p', {'class': 'note'}, 'decoder direction (' + (m.logits[String(layer)] || '') + ') through the unembedding, per unit of activation'));
      } else {
        lg.appendChild(el('p', {'class': 'note'}, (m.notes.filter(function (n) { return n.indexOf('layer ' + layer + ':') === 0; })[0]) ||
          'no logit effects in this site (build it with the transcoder and model)'));
      }
      var ex = $('examples'); ex.querySelectorAll('.group').forEach(function (x) { x.remove(); });
      var titles = [['top activations', -1]];
      rec.g.forEach(function (g, i) { titles.push(['quantile group ' + (i + 1) + ': activations ' + fmt(g[0]) + ' to ' + fmt(g[1]) + ' (' + (rec.n ? pct(g[2] / rec.n) : '0%') + ' of them)', i]); });
      titles.forEach(function (tt) {
        var items = rec.ex.filter(function (e) { return e[0] === tt[1]; });
        if (!items.length) return;
        var sec = el('div', {'class': 'group', 'data-group': tt[1]}); sec.appendChild(el('h3', {}, tt[0]));
        items.forEach(function (e) {
          var line = el('div', {'class': 'ex'}); line.appendChild(el('span', {'class': 'a'}, fmt(e[1])));
          e[3].forEach(function (id, j) {
            var a = e[4][j], sp = el('span', {'class': 'tok' + (j === e[2] ? ' hit' : ''), title: 'activation ' + fmt(a)}, visible(tok(id)));
            if (a > 0) sp.style.background = 'rgba(230,110,20,' + Math.min(a / mx, 1).toFixed(3) + ')';
            line.appendChild(sp);
          });
          sec.appendChild(line);
        });
        ex.appendChild(sec);
      });
    }).catch(fail);
  }
  function fail(err) {
    var main = document.querySelector('main'), p = el('p', {id: 'error'}, String(err && err.message || err));
    p.style.color = '#b00'; main.insertBefore(p, main.firstChild);
  }
  DASH.start = function () {
    var page = document.body.dataset.page;
    if (page === 'index') return startIndex();
    meta().then(function (m) { window.addEventListener('hashchange', function () { renderFeature(m); }); renderFeature(m); }).catch(fail);
  };
})();
