"""``python -m bench``: compare vmdk with qemu-img, qemu-io and pyvmdk (see BENCHMARKS.md)."""

from . import main

raise SystemExit(main())
