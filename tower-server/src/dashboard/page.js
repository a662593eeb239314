"use strict";
(function () {
  document.documentElement.dataset.js = "on";
  var body = document.body;
  var every = Number(body.dataset.refresh || "5") * 1000;
  var token = "";
  var tokenStatus = document.getElementById("token-status");
  function say(el, text, bad) {
    if (!el) return;
    el.textContent = text;
    el.classList.toggle("alert", !!bad);
  }
  // The fleet's filter: shown only with JavaScript, applied again after each refresh.
  var filter = document.getElementById("filter");
  function applyFilter() {
    if (!filter) return;
    var q = filter.value.trim().toLowerCase();
    var shown = 0, rows = document.querySelectorAll("#clusters tbody tr[data-cluster]");
    rows.forEach(function (row) {
      var match = !q || row.dataset.cluster.indexOf(q) !== -1;
      row.hidden = !match;
      if (match) shown++;
    });
    say(document.getElementById("filter-status"), q ? shown + " of " + rows.length + " clusters match" : "");
  }
  if (filter) {
    document.getElementById("filter-box").hidden = false;
    filter.addEventListener("input", applyFilter);
    document.getElementById("filter-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
    });
  }
  function headers() {
    return token ? { Authorization: "Bearer " + token } : {};
  }
  // Fetches this page again and swaps its live part: one renderer (the server's) for
  // the first load, the refresh and the page without JavaScript.
  function refresh() {
    return fetch(location.pathname, { headers: headers(), cache: "no-store" }).then(function (r) {
      return r.text().then(function (text) {
        if (!r.ok) {
          if (token) {
            token = "";
            say(tokenStatus, "Token not used: " + text.trim(), true);
            return refresh();
          }
          throw new Error(text.trim() || r.statusText);
        }
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("live");
        var live = document.getElementById("live");
        if (!fresh || !live) return;
        var focused = document.activeElement && document.activeElement.id;
        var scroller = live.querySelector(".scroll");
        var left = scroller ? scroller.scrollLeft : 0;
        live.replaceChildren.apply(live, Array.prototype.map.call(fresh.childNodes, function (n) {
          return document.importNode(n, true);
        }));
        var again = live.querySelector(".scroll");
        if (again) again.scrollLeft = left;
        if (focused) {
          var el = document.getElementById(focused);
          if (el && live.contains(el)) el.focus();
        }
        document.title = doc.title;
        var stamp = doc.getElementById("updated"), here = document.getElementById("updated");
        if (stamp && here) here.textContent = stamp.textContent;
        applyFilter();
        say(document.getElementById("refresh-status"), "");
      });
    }).catch(function (e) {
      say(document.getElementById("refresh-status"), "Refresh failed: " + e.message + " (retrying)", true);
    });
  }
  var timer = null;
  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(function () {
      if (document.hidden) return schedule();
      refresh().then(schedule);
    }, every);
  }
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) refresh().then(schedule);
  });
  var form = document.getElementById("token-form");
  if (form) {
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var input = document.getElementById("token");
      token = input.value.trim();
      input.value = "";
      say(tokenStatus, token ? "Token held in this page's memory; it goes only in an Authorization header." : "Token forgotten.");
      refresh().then(schedule);
    });
  }
  var yamlStatus = document.getElementById("agent-yaml-status");
  var yamlText = document.getElementById("agent-yaml");
  function agentYaml() {
    var url = body.dataset.agentYaml;
    if (!token) return Promise.reject(new Error("enter an admin token first"));
    return fetch(url, { headers: headers(), cache: "no-store" }).then(function (r) {
      return r.text().then(function (text) {
        if (!r.ok) throw new Error(r.status + ": " + text.trim());
        return text;
      });
    });
  }
  function on(id, f) {
    var el = document.getElementById(id);
    if (el) el.addEventListener("click", f);
  }
  on("agent-yaml-show", function () {
    say(yamlStatus, "Fetching agent.yaml…");
    agentYaml().then(function (text) {
      yamlText.value = text;
      yamlText.classList.remove("hidden");
      say(yamlStatus, "agent.yaml holds the agent token and the cluster key: treat it as a secret.");
    }, function (e) { say(yamlStatus, "agent.yaml refused: " + e.message, true); });
  });
  on("agent-yaml-download", function () {
    agentYaml().then(function (text) {
      var a = document.createElement("a");
      a.href = URL.createObjectURL(new Blob([text], { type: "application/yaml" }));
      a.download = body.dataset.cluster + "-agent.yaml";
      document.body.appendChild(a);
      a.click();
      setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
      say(yamlStatus, "Downloaded " + a.download + ".");
    }, function (e) { say(yamlStatus, "agent.yaml refused: " + e.message, true); });
  });
  on("agent-yaml-copy", function () {
    agentYaml().then(function (text) {
      yamlText.value = text;
      yamlText.classList.remove("hidden");
      if (navigator.clipboard) return navigator.clipboard.writeText(text);
      yamlText.select();
      document.execCommand("copy");
    }).then(function () { say(yamlStatus, "Copied agent.yaml to the clipboard."); },
      function (e) { say(yamlStatus, "Copy failed: " + e.message, true); });
  });
  schedule();
})();
