(function () {
  var info = JSON.parse(document.getElementById('dg-info').textContent);
  var map = dgBaseMap('dg-map', null);
  fetch('/assets/world.geojson').then(function (r) { return r.json(); }).then(function (w) { dgAddOutline(map, w); });
  if (info.bounds) map.fitBounds(L.latLngBounds(info.bounds).pad(0.1)); else map.setView([20, 0], 2);
  var layer = L.layerGroup().addTo(map);
  var $ = function (id) { return document.getElementById(id); };
  var busy = false, queryUrl = null;

  function status(text, isError) {
    $('dg-status').textContent = text || '';
    $('dg-status').className = isError ? 'dg-error' : '';
  }
  function placeLabel(p) {
    if (!p) return '';
    return [p.name, p.admin1, p.country_code].filter(function (x) { return x; }).join(', ');
  }
  function thumb(id) { return '/api/thumb/' + encodeURIComponent(id); }

  function show(pred, matchUrl) {
    layer.clearLayers();
    var pts = [[pred.lat, pred.lon]];
    pred.alternatives.forEach(function (a, j) {
      L.marker([a.lat, a.lon], {icon: dgPin('alt', 'alternative ' + (j + 1))})
        .bindPopup('<div class="dg-popup"><b>Alternative ' + (j + 1) + '</b><img alt="" src="' + thumb(a.id) + '"><div>' +
                   dgEsc(placeLabel(a.place)) + '</div><div class="dg-small">' + a.inliers + ' inliers, ' + a.distance_km.toFixed(2) + ' km away</div></div>')
        .addTo(layer);
      pts.push([a.lat, a.lon]);
    });
    var n = pred.neighbour;
    var m = L.marker([pred.lat, pred.lon], {icon: dgPin('pred', 'predicted location'), zIndexOffset: 1000})
      .bindPopup('<div class="dg-popup"><b>' + dgEsc(placeLabel(pred.place)) + '</b><img alt="" src="' + thumb(n.id) + '">' +
                 '<div class="dg-small">' + pred.lat.toFixed(6) + ', ' + pred.lon.toFixed(6) + '</div></div>')
      .addTo(layer);
    if (pts.length > 1) map.fitBounds(L.latLngBounds(pts).pad(0.25), {maxZoom: 17}); else map.setView(pts[0], 16);
    m.openPopup();

    $('dg-place').textContent = placeLabel(pred.place) || 'unknown place';
    $('dg-coords').textContent = pred.lat.toFixed(6) + ', ' + pred.lon.toFixed(6);
    var pc = Math.round(100 * pred.confidence);
    $('dg-conf-bar').style.width = pc + '%';
    $('dg-conf-bar').style.background = pred.method === 'verified' ? '#2ca02c' : '#ff7f0e';
    $('dg-conf').textContent = (pred.confidence_text || ('confidence ' + pc + '%')) + ' \u00b7 ' + (pred.method === 'verified' ? 'geometrically verified' : 'global similarity only') +
      ' \u00b7 ' + pred.inliers + ' inliers \u00b7 ' + Math.round(pred.timings_ms.extract + pred.timings_ms.search + pred.timings_ms.verify) + ' ms';
    $('dg-note').textContent = pred.note || '';
    var ul = $('dg-matches');
    ul.innerHTML = '';
    var rows = [{id: n.id, lat: n.lat, lon: n.lon, label: 'best match', place: pred.place, extra: n.inliers + ' inliers, similarity ' + n.similarity.toFixed(3)}];
    pred.alternatives.forEach(function (a, j) {
      rows.push({id: a.id, lat: a.lat, lon: a.lon, label: 'alternative ' + (j + 1), place: a.place,
                 extra: a.inliers + ' inliers, ' + a.distance_km.toFixed(2) + ' km away'});
    });
    rows.forEach(function (r) {
      var li = document.createElement('li');
      li.className = 'dg-match';
      li.innerHTML = '<img alt="" loading="lazy" src="' + thumb(r.id) + '"><div><div><b>' + dgEsc(r.label) + '</b> ' + dgEsc(placeLabel(r.place)) +
                     '</div><div class="dg-small">' + dgEsc(r.extra) + '</div></div>';
      li.addEventListener('click', function () { map.setView([r.lat, r.lon], Math.max(map.getZoom(), 16)); });
      ul.appendChild(li);
    });
    if (matchUrl) { $('dg-match-img').src = matchUrl; $('dg-match-link').href = matchUrl; }
    $('dg-result').className = '';
  }

  function upload(file) {
    if (!file || busy) return;
    if (file.size > info.max_upload_bytes) {
      status('This file is ' + (file.size / 1048576).toFixed(1) + ' MB; the limit is ' + (info.max_upload_bytes / 1048576) + ' MB.', true);
      return;
    }
    busy = true;
    status('Locating ' + file.name + '\u2026');
    if (queryUrl) URL.revokeObjectURL(queryUrl);
    queryUrl = URL.createObjectURL(file);
    $('dg-query').innerHTML = '';
    var img = document.createElement('img'); img.alt = 'your photo'; img.src = queryUrl; $('dg-query').appendChild(img);
    var fd = new FormData();
    fd.append('file', file, file.name);
    fetch('/api/locate', {method: 'POST', body: fd}).then(function (r) {
      return r.json().catch(function () { return {detail: r.status + ' ' + r.statusText}; }).then(function (body) {
        if (!r.ok) throw new Error(body.detail || (r.status + ' ' + r.statusText));
        show(body, r.headers.get('X-Match-Image'));
        status('Located ' + file.name + '.');
      });
    }).catch(function (e) {
      status('Could not locate ' + file.name + ': ' + e.message, true);
    }).then(function () { busy = false; $('dg-file').value = ''; });
  }

  $('dg-file').addEventListener('change', function (e) { upload(e.target.files[0]); });
  var drop = $('dg-drop');
  ['dragenter', 'dragover'].forEach(function (ev) {
    document.addEventListener(ev, function (e) { e.preventDefault(); drop.classList.add('dg-over'); });
  });
  ['dragleave', 'drop'].forEach(function (ev) {
    document.addEventListener(ev, function (e) { e.preventDefault(); drop.classList.remove('dg-over'); });
  });
  document.addEventListener('drop', function (e) {
    var f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (f) upload(f);
  });
})();
