"""The performance helpers, in one place: each fast path beside the plain version that
tests compare it with.  parallel: order-keeping maps on threads and on a forked process;
compare: buffers and mapped file ranges compared in place."""
