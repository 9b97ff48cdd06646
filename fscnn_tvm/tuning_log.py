"""Opening a tuning log (meta_schedule's JSON database: a workload file and a records file,
one JSON value per line) without letting a damaged line crash or disable it.

TVM's loader trusts each line: a record line of the wrong shape (an object, ``null``) is
dereferenced as an array and segfaults; other wrong shapes, an out-of-range workload index or
a trace TVM cannot apply raise and leave the whole log unusable. Such lines come from a job
killed mid-write, hand edits or other tools, so we check the lines first and load the rest.
A record names its workload by line number in the workload file, so dropping a workload line
renumbers the records after it and drops the records that pointed at it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile

from tvm.s_tir import meta_schedule as ms

log = logging.getLogger("fscnn_tvm.tuning")
WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"
_BAD_LINE = (ValueError, TypeError, RuntimeError)  # what json and TVM's parsers raise on a bad line
_warned = set()


def open_database(log_dir: str, write: bool = False):
    """The log's records as a meta_schedule database, lines TVM cannot load left out with one
    warning per log. ``write`` (a tuning job appends to the log): the files are rewritten
    without those lines, the originals kept as ``.bad``. Otherwise the log is only read: it is
    loaded into memory and its files are left as they are (it may be read-only or shared)."""
    paths = _paths(log_dir)
    if write:
        os.makedirs(log_dir, exist_ok=True)
    lines = [_lines(p) for p in paths]
    _, dropped = _loadable(*lines)
    if not any(dropped) and (write or all(map(os.path.exists, paths))):
        with contextlib.suppress(*_BAD_LINE):  # else a well-formed line TVM cannot load: found below
            return ms.database.JSONDatabase(work_dir=log_dir)
    if not write:
        return load_lines(log_dir, *lines)
    _warn(log_dir, lines, _rewritten(paths, lines), write)
    return ms.database.JSONDatabase(work_dir=log_dir)


def load_lines(name: str, workload_lines: list, record_lines: list):
    """A MemoryDatabase of a log's lines (``name`` labels the warning), lines TVM cannot load
    left out with one warning: how a log that is only read is opened, wherever its lines come
    from (a directory, or package data inside a wheel or a zip)."""
    kept, dropped = _loadable(workload_lines, record_lines)
    if not any(dropped):
        with contextlib.suppress(*_BAD_LINE):  # else a well-formed line TVM cannot load: found below
            return _in_memory(*kept)
    kept, dropped = _loadable(workload_lines, record_lines, parse=True)
    _warn(name, [workload_lines, record_lines], dropped, write=False)
    return _in_memory(*kept)


def damaged_lines(log_dir: str) -> dict:
    """{file name: numbers of the lines TVM cannot load} of a log directory; nothing is written."""
    return _named(_loadable(*(_lines(p) for p in _paths(log_dir)), parse=True)[1])


def repair(log_dir: str) -> dict:
    """Rewrite a log without the lines TVM cannot load, the originals kept as ``.bad`` (a
    file with nothing to leave out is not touched); returns what ``damaged_lines`` found."""
    paths = _paths(log_dir)
    return _named(_rewritten(paths, [_lines(p) for p in paths]))


def _named(dropped):
    return {name: numbers for name, numbers in zip((WORKLOADS, RECORDS), dropped) if numbers}


def _rewritten(paths, lines):
    """Rewrite the log's files without the lines TVM cannot load; returns the dropped numbers."""
    kept, dropped = _loadable(*lines, parse=True)
    for path, keep in zip(paths, kept):
        _rewrite(path, keep)
    return dropped


def _paths(log_dir):
    """The log's two files; records name their workload by line, so records without the
    workload file are an error, not an empty log."""
    paths = os.path.join(log_dir, WORKLOADS), os.path.join(log_dir, RECORDS)
    if not os.path.exists(paths[0]) and _lines(paths[1]):
        raise FileNotFoundError(f"{paths[0]} is missing: the records in {paths[1]} refer to its lines; restore it, "
                                f"or tune again into an empty directory")
    return paths


def _lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.readlines()


def _loadable(workload_lines, record_lines, parse=False):
    """([workload lines, record lines] TVM can load, [numbers of the workload lines, of the
    record lines] left out). ``parse``: each record is parsed by TVM too (applying its trace),
    not only checked for shape."""
    kept, dropped = ([], []), ([], [])
    workloads, renumber = [], {}
    for number, line in enumerate(workload_lines):
        try:
            value = _json(line)
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
                raise ValueError("not [hash, module]")
            workloads.append(ms.database.Workload.from_json(value))
        except _BAD_LINE:
            dropped[0].append(number + 1)
            continue
        renumber[number] = len(kept[0])
        kept[0].append(line if line.endswith("\n") else line + "\n")
    for number, line in enumerate(record_lines):
        try:
            value = _json(line)
            index, record = value if isinstance(value, list) and len(value) == 2 else (None, None)
            if type(index) is not int or index not in renumber or not _is_record(record):
                raise ValueError("not [workload line, record]")
            if parse:
                ms.database.TuningRecord.from_json(record, workloads[renumber[index]])
        except _BAD_LINE:
            dropped[1].append(number + 1)
            continue
        if renumber[index] != index:
            line = json.dumps([renumber[index], record], separators=(",", ":"))
        kept[1].append(line if line.endswith("\n") else line + "\n")
    return kept, dropped


def _json(line):
    """A line's JSON value; NaN and Infinity are not JSON to TVM's parser."""
    def reject(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(line, parse_constant=reject)


def _is_record(record) -> bool:
    """The shape of a TuningRecord's JSON: [[instructions, decisions], run_secs or null,
    target config or null, argument infos or null]."""
    if not (isinstance(record, list) and len(record) == 4):
        return False
    trace, secs, target, args = record
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return (isinstance(trace, list) and len(trace) == 2 and all(isinstance(t, list) for t in trace)
            and all(isinstance(i, list) and len(i) == 4 and isinstance(i[0], str) for i in trace[0])
            and all(isinstance(d, list) and len(d) == 2 and type(d[0]) is int for d in trace[1])
            and (secs is None or isinstance(secs, list) and all(map(number, secs)))
            and (target is None or isinstance(target, dict))
            and (args is None or isinstance(args, list) and all(isinstance(a, list) and a for a in args)))


def _warn(log_dir, lines, dropped, write):
    if not any(dropped):
        return
    key = (str(log_dir), hash(tuple(map(tuple, lines))))  # once per log and content
    if key in _warned:
        return
    _warned.add(key)
    where = "; ".join(f"{name} line(s) {', '.join(map(str, n[:5]))}{', ...' if len(n) > 5 else ''}"
                      for name, n in zip((WORKLOADS, RECORDS), dropped) if n)
    log.warning("%s: %d line(s) left out: not a complete workload or record, or a record whose workload line is "
                "gone (%s); %s", log_dir, sum(map(len, dropped)), where,
                "the originals are kept as *.bad" if write else "the files are left unchanged")


def _rewrite(path, lines):
    if _lines(path) == lines:
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    if os.path.exists(path):
        os.replace(path, path + ".bad")
    os.replace(path + ".tmp", path)


def _in_memory(workload_lines, record_lines):
    """The given lines loaded by TVM (from a temporary copy) into a MemoryDatabase."""
    db = ms.database.MemoryDatabase()
    with tempfile.TemporaryDirectory(prefix="fscnn-log-") as tmp:
        for name, lines in ((WORKLOADS, workload_lines), (RECORDS, record_lines)):
            with open(os.path.join(tmp, name), "w") as f:
                f.writelines(lines)
        copy_records(ms.database.JSONDatabase(work_dir=tmp), db)
    return db


def copy_records(source, db, keep=None) -> int:
    """Every tuning record of database ``source`` (with its workload) into ``db``, or those
    ``keep(record)`` accepts; returns how many."""
    copied = 0
    for record in source.get_all_tuning_records():
        if keep is None or keep(record):
            db.commit_workload(record.workload.mod)
            db.commit_tuning_record(record)
            copied += 1
    return copied
