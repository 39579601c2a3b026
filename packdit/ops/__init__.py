"""Packed-batch ops. Each op is a ``torch.library`` custom op (``torch.ops.packdit.*``) that runs
the native extension ``packdit._C`` when it is available and a pure PyTorch implementation otherwise."""
