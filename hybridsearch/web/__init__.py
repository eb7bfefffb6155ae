"""The search page's static files (``index.html``, ``app.js``, ``style.css``; ``MANIFEST`` lists
the names served under ``/assets/``). Plain HTML/CSS/JS: no build step, nothing from a CDN."""
