"""Batches made ahead, in a thread, while the model trains on the one before.

Ray Data's ``prefetch_batches`` fetches blocks ahead, but what happens after a batch leaves Ray
Data happens where it is consumed: with ``data.decode_on: gpu``, the nvJPEG decode and the
augmentation. Done in the training loop's thread, that work waits for the step before it and the
step waits for it. ``Prefetcher`` moves it into a thread of its own, started as soon as it is made
(so the first epoch's data flows while the model is built: warm ingest), on a CUDA stream of its
own. (``iter_torch_batches``'s own copy to the GPU is not on that stream: Ray 2.60 runs its whole
batch pipeline, the copy included, in a thread of Ray's, on that thread's default CUDA stream.)
"""

from __future__ import annotations

import contextlib
import queue
import threading

_END = object()


def tensors(item):
    """The torch tensors in a batch (a tensor, or a dict / list / tuple of them)."""
    import torch

    if isinstance(item, torch.Tensor):
        yield item
    elif isinstance(item, dict):
        for value in item.values():
            yield from tensors(value)
    elif isinstance(item, (list, tuple)):
        for value in item:
            yield from tensors(value)


class Prefetcher:
    """Iterates ``iterable`` in a thread from the moment it is made, keeping up to ``ahead`` items
    ready; yields them in order, and raises where they are consumed what the iterable raised.

    On a CUDA ``device`` the thread's device work runs on a side stream. Before an item is handed
    over, the consumer's stream waits for the event recorded after it was made, and its tensors are
    marked as used on the consumer's stream, so the caching allocator does not reuse their memory
    while the step still reads them. Leaving the loop early (``break``, an exception) stops the
    thread: it never blocks on a full queue nobody reads."""

    def __init__(self, iterable, ahead: int = 1, device=None) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(ahead)))
        self._stop = threading.Event()
        self._cuda = device if getattr(device, "type", None) == "cuda" else None
        self._thread = threading.Thread(target=self._run, args=(iterable,), name="ralflow-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterable) -> None:
        stream, scope = None, contextlib.nullcontext()
        try:
            if self._cuda is not None:
                import torch

                if self._cuda.index is not None:  # the thread's kernels go to the consumer's GPU
                    torch.cuda.set_device(self._cuda)
                stream = torch.cuda.Stream(self._cuda)
                scope = torch.cuda.stream(stream)
            with scope:
                for item in iterable:
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not self._put((item, event, None)):
                        return
        except BaseException as exc:  # noqa: BLE001 - raised in the consumer's thread
            self._put((None, None, exc))
            return
        self._put(_END)

    def __iter__(self):
        try:
            while True:
                got = self._queue.get()
                if got is _END:
                    return
                item, event, error = got
                if error is not None:
                    raise error
                if event is not None:
                    import torch

                    current = torch.cuda.current_stream(self._cuda)
                    current.wait_event(event)
                    for t in tensors(item):
                        if t.is_cuda:
                            t.record_stream(current)
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop making items (the thread ends at its next hand-over)."""
        self._stop.set()
