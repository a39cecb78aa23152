import sys

from palp.cli import main

if len(sys.argv) > 1 and sys.argv[1] == "pipeline":  # the layer above the library adds it
    sys.exit("palp pipeline …: the pipeline commands sit above the library; run the installed `palp` command "
             "or `python -m pipelines pipeline …`")
sys.exit(main())
