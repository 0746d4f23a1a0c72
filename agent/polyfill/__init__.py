"""Request polyfill: a policy rule adds missing KServe V2 parameters to one client's requests.

The connect hook (bpf/steer.c) steers only the named client's connections to the named service
to a small rewriter (rewriter.py) in that client's network namespace; everything else stays on
the kernel path. unit.py runs the rewriters and keeps the kernel map in step with them."""
