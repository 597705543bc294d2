"""The Open Inference Protocol (KServe v2, as Triton speaks it): its messages and tensors (``tensors``), and
one adapter per task from named tensors to the task's verbs and back (``adapters``). The routes are
``app/routes/v2.py``."""
