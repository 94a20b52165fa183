"""Triton's interpreter (TRITON_INTERPRET=1: how the Triton kernels run on CPUs) without its repeated
patching: every call of a device function (a @triton.jit helper called from a kernel) patches
triton.language again, although the launch running the kernel patched those modules already and
restores them when it ends. The repeat finds nothing left to patch (a patched member is no longer a
builtin) but walks the modules with inspect.getmembers each time: about a quarter of the attention
kernels' time. Inside a launch that already patched the modules a device function sees, it is skipped;
everything else runs as Triton wrote it, so the kernels compute exactly what they computed before."""
from __future__ import annotations

import inspect


def skip_repeated_patching() -> bool:
    """Installs the skip; False where this Triton is not the interpreter this was written against."""
    try:
        from triton import language as tl
        from triton.runtime import interpreter as it
    except ImportError:
        return False
    patch = getattr(it, "_patch_lang", None)
    launch = getattr(getattr(it, "GridExecutor", None), "__call__", None)
    if patch is None or launch is None or not hasattr(it, "_LangPatchScope") or hasattr(patch, "tandem_skip"):
        return False
    patched: list[set[int]] = []  # per launch in progress: the language modules it has patched

    def langs(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_once(fn):
        if not patched:  # outside a launch: as Triton does it
            return patch(fn)
        if langs(fn) <= patched[-1]:
            return it._LangPatchScope()  # nothing to restore: the launch restores what it patched
        scope = patch(fn)
        patched[-1] |= langs(fn)
        return scope

    def launch_tracked(self, *args, **kwargs):
        patched.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    patch_once.tandem_skip = True
    it._patch_lang = patch_once
    it.GridExecutor.__call__ = launch_tracked
    return True
