"""The ops: a small op in one module (kernels, launcher, torch.library
registration, autograd, FLOP formula, compile specs); a big one as a package
split by job (``attention``, ``gather_patch_embed``, ``topk_tokens``);
``selection`` holds what the selection ops share, ``_common`` the dispatch
and checks every op shares."""
