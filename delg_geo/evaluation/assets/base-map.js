function dgBaseMap(elementId, world, options) {
  var map = L.map(elementId, Object.assign({worldCopyJump: true, zoomSnap: 0.5}, options || {}));
  map.createPane('dgOutline');
  map.getPane('dgOutline').style.zIndex = 150;  // under the tiles (200): shows only where tiles fail
  if (world) dgAddOutline(map, world);
  var loaded = 0, failed = 0, note = null;
  var tiles = L.tileLayer({{tiles}}, {maxZoom: 19, attribution: {{attribution}},
                                       errorTileUrl: {{blank}}, crossOrigin: false});
  tiles.on('tileload', function () { loaded++; if (note) { note.remove(); note = null; } });
  tiles.on('tileerror', function () {
    failed++;
    if (!loaded && !note) {
      note = L.control({position: 'bottomleft'});
      note.onAdd = function () {
        var d = L.DomUtil.create('div', 'dg-offline-note');
        d.textContent = 'Map tiles unavailable (offline?): showing the built-in world outline.';
        return d;
      };
      note.addTo(map);
    }
  });
  tiles.addTo(map);
  L.control.scale({imperial: false}).addTo(map);
  return map;
}
function dgAddOutline(map, world) {
  return L.geoJSON(world, {pane: 'dgOutline', interactive: false,
    style: {color: '#7a7a7a', weight: 0.8, fillColor: '#f2efe9', fillOpacity: 1}}).addTo(map);
}
function dgPin(kind, label) {
  return L.divIcon({className: 'dg-pin-wrap', iconSize: [22, 22], iconAnchor: [11, 11], popupAnchor: [0, -10],
                    html: '<div class="dg-pin dg-' + kind + '" title="' + (label || kind) + '"></div>'});
}
function dgEsc(s) {
  return String(s === undefined || s === null ? '' : s).replace(/[&<>"']/g, function (c) {
    return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c];
  });
}
