"""python -m serve CONFIG [key=value ...]     export the fine-tuned model as a bundle (the pipeline's last stage)
python -m serve up --bundle DIR [options]   serve a bundle: /v1/embeddings, /search, /health (see --help)
"""

import sys

from embtune.cli import stage_main
from serve.export import run


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "up":
        from serve.app import main as serve_main

        serve_main(argv[1:])
        return 0
    return stage_main("serve", run, ["export", "serve"], argv)


if __name__ == "__main__":
    sys.exit(main())
