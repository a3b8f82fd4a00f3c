"""The pipeline's stages. Every stage process (a KFP task, `dcml <stage>`) imports this package first."""

import logging as _logging

# faiss logs every SIMD variant it fails to load at INFO, and KFP's executor logs INFO: stage logs stay
# readable. Set here, for stage processes, not by `import dcml` (which changes nothing of the process).
_logging.getLogger("faiss.loader").setLevel(_logging.WARNING)
