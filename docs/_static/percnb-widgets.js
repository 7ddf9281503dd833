// Loaded after require.js and before the widget bundle (conf.py: nb_ipywidgets_js). The bundle's
// modules find their own files (fonts) relative to require.js's base URL, which defaults to the
// page's folder: point it at _static/npm/, where the bundle sits in its node_modules layout.
// <html data-content_root="../"> is the page's path to the site root (Sphinx writes it).
require.config({ baseUrl: document.documentElement.dataset.content_root + "_static/npm/" });
