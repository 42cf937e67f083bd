"""Starting `bpwopt serve`: the roots, the token where the address is not loopback, then uvicorn."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from bpwopt.errors import BpwoptError
from bpwopt.serve.access import needs_token, new_token
from bpwopt.serve.journal import JOURNAL_NAME
from bpwopt.serve.roots import Roots

DEFAULT_PORT = 8765


def serve(host: str, port: int, roots: Sequence[Path], jobs_file: Path | None = None) -> None:
    """Serve the API over roots at host:port until interrupted; the job list is kept in jobs_file
    (default: JOURNAL_NAME in the first root)."""
    try:
        import uvicorn

        from bpwopt.serve.api import create_app
    except ImportError as missing:
        raise BpwoptError(f"bpwopt serve needs {missing.name}: pip install 'bpwopt[serve]'") from None
    folders = Roots.of(roots)
    token = new_token() if needs_token(host) else None
    address = f"http://{host}:{port}/"
    print(f"bpwopt: serving {', '.join(map(str, folders.folders))}", file=sys.stderr)
    print(f"bpwopt: {address}docs{f'?token={token}' if token else ''}", file=sys.stderr)
    app = create_app(folders, token, jobs_file or folders.folders[0] / JOURNAL_NAME)
    uvicorn.run(app, host=host, port=port, log_level="warning")
