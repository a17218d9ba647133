// ReDoc from this origin only; no Google fonts.
Redoc.init("/openapi.json", { disableSearch: false, hideDownloadButton: false }, document.getElementById("redoc"));
