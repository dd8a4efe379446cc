"""The native container (spec/format.md): reader, RAM blocks, chunk encodings, writer."""
