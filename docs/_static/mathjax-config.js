// MathJax 3 configuration, inlined by Sphinx before MathJax loads (conf.py: mathjax_config_path), after
// myst-nb's own settings, which it keeps. The widget manager (@jupyter-widgets/html-manager 1.x)
// typesets widget labels with MathJax 2's `MathJax.Hub.Queue(["Typeset", MathJax.Hub, element])`,
// which MathJax 3 lacks, so the call throws; once MathJax 3 is ready, this `Hub.Queue` typesets the
// element with MathJax 3's API instead.
window.MathJax = window.MathJax || {};
window.MathJax.startup = Object.assign(window.MathJax.startup || {}, {
  ready() {
    MathJax.startup.defaultReady();
    MathJax.Hub = {
      Queue(command) {
        const element = Array.isArray(command) ? command[2] : undefined;
        if (element) MathJax.startup.promise.then(() => MathJax.typesetPromise([element]));
      },
    };
  },
});
