"""QEMU migration streams: the walk that finds every record (walk, records), the page
map of each RAM block (pagemap), the Snapshot over a walked stream (snapshot, ramblock),
the writer, the mapping of QEMU identities to device paths (paths), and a driver for a
real QEMU over QMP (qmp)."""
