"""The package's lowest layer: image files in and out, input listing, processes and devices.

`images` is the one image reader and writer (EXIF orientation, size limits, 16-bit / float
normalisation, tensors, PNG), `inputs` lists image files (one rule for hidden files) and the items of
a folder run, `runtime` the device and the share of a process. These modules import only
`vis2ir.errors`, `vis2ir.files` and libraries; everything else imports them.
"""
