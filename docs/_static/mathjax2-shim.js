// The Jupyter widget manager (@jupyter-widgets/html-manager 1.x) typesets labels through MathJax 2's
// MathJax.Hub.Queue(["Typeset", MathJax.Hub, element]) whenever window.MathJax exists; the site loads MathJax 3,
// which has no Hub. Loaded (deferred) after MathJax 3, this forwards those calls to MathJax 3's typesetPromise.
(function () {
  if (!window.MathJax || window.MathJax.Hub) return;
  window.MathJax.Hub = {
    Queue: function (job) {
      var element = job && job[2];
      var mj = window.MathJax;
      if (!element || !mj.startup) return;
      mj.startup.promise.then(function () { return mj.typesetPromise([element]); });
    },
  };
})();
