"""The guest's view of a snapshot: guest-physical memory and the CPUs' registers.

``physmap`` lays the RAM blocks out at the guest-physical addresses QEMU gives them for
the snapshot's machine type (spec/memory.md); ``cpu`` reads the registers from the CPU
sections.  snapfmt.ops.memory writes ELF cores and raw images from both.
"""
