"""The ``fastmsc`` subcommands, one module each: ``info``, ``train``, ``predict``, ``evaluate``, ``bench``.

Each defines ``add_arguments(parser)`` and ``run(args) -> int``, and may define ``main(args) -> int``, which
:mod:`fastmsc.cli` calls instead of ``run`` to report user errors as one line and exit status 2. They hold only
the command line; the work is the library's (:mod:`fastmsc.info`, :mod:`fastmsc.train`, :mod:`fastmsc.models`,
:mod:`fastmsc.bench`). ``_usage`` holds what they share (UsageError, the check that an output can be written).
"""
