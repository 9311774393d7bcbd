// Feature index: sort, search and page through window.FEATURE_INDEX (loaded by index_data.js; no network).
// Row layout: [id, density, max, score (or null), "top tokens separated by \u001f", explanation (or "")].
(function () {
  "use strict";
  var data = window.FEATURE_INDEX;
  var PAGE = 200;
  var rows = data.rows;
  var state = { key: 0, desc: false, query: "", page: 0, view: rows };
  var body = document.querySelector("#features tbody");
  var info = document.getElementById("count");
  var prev = document.getElementById("prev");
  var next = document.getElementById("next");
  var search = document.getElementById("search");

  function fmt(x) {
    if (x === null || x === undefined) return "";
    if (x === 0) return "0";
    var a = Math.abs(x);
    return (a >= 1e-3 && a < 1e5) ? String(+x.toPrecision(4)) : x.toExponential(2);
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function matches(r, q) {
    if (!q) return true;
    if (/^#?\d+$/.test(q)) return r[0] === parseInt(q.replace("#", ""), 10);
    var t = r[4].toLowerCase();
    return t.indexOf(q) >= 0 || (r[5] || "").toLowerCase().indexOf(q) >= 0;
  }
  function apply() {
    var q = state.query.trim().toLowerCase();
    var k = state.key, sign = state.desc ? -1 : 1;
    state.view = rows.filter(function (r) { return matches(r, q); });
    state.view.sort(function (a, b) {
      var x = a[k], y = b[k];
      if (x === null && y === null) return a[0] - b[0];
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : x > y ? 1 : 0) * sign || a[0] - b[0];
    });
    var pages = Math.max(1, Math.ceil(state.view.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    render(pages);
  }
  function render(pages) {
    body.textContent = "";
    var start = state.page * PAGE, end = Math.min(state.view.length, start + PAGE);
    for (var i = start; i < end; i++) {
      var r = state.view[i];
      var tr = el("tr", r[2] > 0 ? "" : "dead");
      var a = el("a", "", "#" + r[0]);
      a.href = "features/" + r[0] + ".html";
      var td = el("td"); td.appendChild(a); tr.appendChild(td);
      tr.appendChild(el("td", "num", fmt(r[1])));
      tr.appendChild(el("td", "num", fmt(r[2])));
      if (data.has_score) tr.appendChild(el("td", "num", fmt(r[3])));
      var toks = el("td");
      r[4].split("\u001f").forEach(function (t) { if (t) toks.appendChild(el("span", "chip", t)); });
      if (r[5]) toks.appendChild(el("div", "note", r[5]));
      tr.appendChild(toks);
      body.appendChild(tr);
    }
    info.textContent = state.view.length === rows.length
      ? (rows.length + " features") : (state.view.length + " of " + rows.length + " features");
    if (state.view.length > PAGE) info.textContent += " \u00b7 page " + (state.page + 1) + " of " + pages;
    prev.disabled = state.page === 0;
    next.disabled = state.page >= pages - 1;
    document.querySelectorAll("#features th.sort").forEach(function (th) {
      var on = +th.dataset.key === state.key;
      th.classList.toggle("active", on);
      th.querySelector(".arrow").textContent = on ? (state.desc ? " \u25bc" : " \u25b2") : "";
    });
  }
  document.querySelectorAll("#features th.sort").forEach(function (th) {
    th.addEventListener("click", function () {
      var k = +th.dataset.key;
      state.desc = state.key === k ? !state.desc : k !== 0;
      state.key = k; state.page = 0;
      apply();
    });
  });
  search.addEventListener("input", function () { state.query = search.value; state.page = 0; apply(); });
  prev.addEventListener("click", function () { state.page--; apply(); });
  next.addEventListener("click", function () { state.page++; apply(); });
  // Links can preset the view: index.html?q=parser&sort=density&desc=1 (sort: id, density, max, score).
  var params = new URLSearchParams(location.search);
  var names = { id: 0, density: 1, max: 2, score: 3 };
  if (params.get("q")) { search.value = params.get("q"); state.query = params.get("q"); }
  if (params.get("sort") in names) { state.key = names[params.get("sort")]; state.desc = params.get("desc") === "1"; }
  apply();
})();
