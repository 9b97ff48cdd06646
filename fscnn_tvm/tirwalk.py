"""Rewriting scheduled TIR from Python. TVM's Python API has no statement mutator, hence this
small rebuild, which knows every statement kind a scheduled kernel holds and refuses any other: a
rewrite that silently skipped a node it cannot see into would leave, say, channels unpermuted."""
from __future__ import annotations

import tvm


def for_with(loop, body=None, extent=None, annotations=None):
    """``loop`` with its body, extent or annotations replaced."""
    return tvm.tirx.For(loop.loop_var, loop.min, loop.extent if extent is None else extent, loop.kind,
                        loop.body if body is None else body, loop.thread_binding,
                        loop.annotations if annotations is None else annotations)


def block_with(block, body, alloc_buffers=None, reads=None):
    """``block`` with its body (and the buffers it allocates, or the regions it reads) replaced."""
    from tvm.s_tir.stmt import SBlock
    return SBlock(block.iter_vars, block.reads if reads is None else reads, block.writes, block.name_hint, body,
                  block.init,
                  block.alloc_buffers if alloc_buffers is None else alloc_buffers, block.match_buffers,
                  block.annotations)


# Statements without statements inside.
LEAVES = (tvm.tirx.BufferStore, tvm.tirx.Evaluate, tvm.tirx.AllocBuffer)


def rebuild(stmt, post):
    """``stmt`` rebuilt bottom-up with ``post(node)`` replacing each node (None keeps it).
    Knows the statements a scheduled sparse kernel holds; any other kind is an error."""
    from tvm.s_tir.stmt import SBlock, SBlockRealize
    tirx = tvm.tirx
    new = stmt
    if isinstance(stmt, tirx.For):
        body = rebuild(stmt.body, post)
        if not body.same_as(stmt.body):
            new = for_with(stmt, body=body)
    elif isinstance(stmt, tirx.SeqStmt):
        seq = [rebuild(s, post) for s in stmt.seq]
        if not all(a.same_as(b) for a, b in zip(seq, stmt.seq)):
            new = tirx.SeqStmt(seq)
    elif isinstance(stmt, SBlockRealize):
        block = rebuild(stmt.block, post)
        if not block.same_as(stmt.block):
            new = SBlockRealize(stmt.iter_values, stmt.predicate, block)
    elif isinstance(stmt, SBlock):
        body = rebuild(stmt.body, post)
        if not body.same_as(stmt.body):
            new = block_with(stmt, body)
    elif isinstance(stmt, tirx.IfThenElse):  # (made by ``split_partial_vector``)
        then_case = rebuild(stmt.then_case, post)
        else_case = None if stmt.else_case is None else rebuild(stmt.else_case, post)
        if not then_case.same_as(stmt.then_case) or (else_case is not None and not else_case.same_as(stmt.else_case)):
            new = tirx.IfThenElse(stmt.condition, then_case, else_case)
    elif not isinstance(stmt, LEAVES):
        raise NotImplementedError(f"a scheduled kernel holds a {type(stmt).__name__}, which the "
                                  "rewrite does not know how to look into")
    replaced = post(new)
    return new if replaced is None else replaced


def at_lane(realize, lane=None, value=None):
    """A function giving an expression of ``realize``'s block variables in terms of its loops,
    simplified with ``lane`` at ``value`` where given (else as it is)."""
    import tvm_ffi
    bound_to = {v.var: bound for v, bound in zip(realize.block.iter_vars, realize.iter_values)}

    def at(expr):
        expr = tvm_ffi.structural_map(expr, (tvm.tirx.Var, lambda v: bound_to.get(v, v)))
        if value is None:
            return expr
        analyzer = tvm.sym.Analyzer()
        analyzer.bind(lane, value)
        return analyzer.simplify(expr)
    return at


def visit(stmt, found):
    """Every node under ``stmt`` (itself included) into ``found``, children first."""
    rebuild(stmt, lambda node: found.append(node))
    return found
