"""One Ray Serve replica of ``ralflow serve`` (see ``components.serve``): the model the alias
points at, re-resolved every ``refresh_s``, with concurrent requests batched into one call."""

from __future__ import annotations

import asyncio
import logging
import threading

from ray import serve

log_ = logging.getLogger("ralflow.serve")


class ChampionService:
    """One Serve replica: the model the alias points at, re-resolved every ``refresh_s``."""

    def __init__(self, opts, tracking_uri: str) -> None:
        import mlflow

        from .tracking import client

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.opts = opts
        self.client = client(tracking_uri)
        self.current = self._load(self._alias_version())
        self.score.set_max_batch_size(opts.max_batch_size)
        self.score.set_batch_wait_timeout_s(opts.batch_wait_ms / 1000)
        self._stop = threading.Event()
        threading.Thread(target=self._follow_alias, name="ralflow-alias", daemon=True).start()

    def _alias_version(self) -> str:
        return str(self.client.get_model_version_by_alias(self.opts.model_name, self.opts.alias).version)

    def _load(self, version: str) -> dict:
        import mlflow

        pyfunc = mlflow.pyfunc.load_model(f"models:/{self.opts.model_name}/{version}")
        model = pyfunc.unwrap_python_model()
        return {"version": version, "model": model, "labels": list(model.label_names), "size": model.image_size}

    def _follow_alias(self) -> None:
        while not self._stop.wait(self.opts.refresh_s):
            try:
                version = self._alias_version()
                if version != self.current["version"]:
                    log_.warning("alias %s moved to version %s: loading it", self.opts.alias, version)
                    self.current = self._load(version)  # one assignment: requests see old or new
            except Exception as exc:  # noqa: BLE001 - a registry blip: keep serving what is loaded
                log_.warning("could not check alias %s: %s", self.opts.alias, exc)

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        current = self.current
        if request.method == "GET" and path in ("health", "healthz"):
            return JSONResponse(
                {"status": "ok", "model": self.opts.model_name, "alias": self.opts.alias, "version": current["version"]}
            )
        if request.method != "POST" or path not in ("predict", ""):
            return JSONResponse({"error": "POST an image file to /predict, or GET /health"}, status_code=404)
        body, error = await image_bytes(request)
        if error:
            return JSONResponse({"error": error}, status_code=400)
        from components.data.images import ImageRejected
        from components.models.pyfunc import decode_column

        try:
            pixels = (await asyncio.to_thread(decode_column, [body], current["size"]))[0]
        except ImageRejected as exc:
            return JSONResponse({"error": str(exc).removeprefix("row 0: ")}, status_code=422)
        probs, served = await self.score((pixels, current))
        answer = {
            "model": self.opts.model_name,
            "version": served["version"],
            "findings": {name: round(float(p), 6) for name, p in zip(served["labels"], probs)},
        }
        decisions = served["model"].decide(probs[None])
        if decisions is not None:  # the model carries thresholds fitted on validation
            answer["decisions"] = {name: bool(d) for name, d in zip(served["labels"], decisions[0])}
        return JSONResponse(answer)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score(self, items: list) -> list:
        """Concurrent requests in one model call (grouped by the version they were decoded for)."""
        import numpy as np

        out: list = [None] * len(items)
        by_version: dict = {}
        for i, (_, model) in enumerate(items):
            by_version.setdefault(model["version"], (model, []))[1].append(i)
        for model, rows in by_version.values():
            batch = np.stack([items[i][0] for i in rows])
            probs = await asyncio.to_thread(model["model"].predict_pixels, batch)
            for i, p in zip(rows, probs):
                out[i] = (p, model)
        return out


async def image_bytes(request) -> tuple[bytes, str | None]:
    """The image a request carries: its body (``curl --data-binary @film.dcm``), or the one file
    of a form upload (``curl -F file=@film.dcm``, ``requests.post(url, files=...)``, a browser
    form), parsed by Starlette; (bytes, None), or (b"", what is wrong)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        body = await request.body()
        return body, None if body else "empty request body: POST the image file's bytes"
    form = await request.form()
    try:
        files = [value for _, value in form.multi_items() if hasattr(value, "read")]
        if len(files) != 1:
            return b"", f"a form upload must hold one image file, got {len(files)}"
        body = await files[0].read()
    finally:
        await form.close()
    return body, None if body else f"the uploaded file {files[0].filename!r} is empty"
