"""`vis2ir translate`: a labelled RGB data set in, its thermal version out, same layout, annotations carried over.

The data flow, one module each:
- `layouts`: which layout the source has (COCO, YOLO, Pascal VOC or a plain folder), its photos and their
  box annotations, and how its annotation files are carried into the output (torch-free);
- `edits`: the line and element edits of the carried files (a photo's suffix, paths into the source, a failed
  photo's lines), every other byte kept;
- `record`: what a run has done: one JSONL manifest per rank, the settings the output was started with
  (a restart with others is refused), and the data-set card;
- `run`: the runner: photos decoded and their maps drawn in loader workers, denoised in batches, written
  by a writer thread, sharded over processes (RANK/WORLD_SIZE), resumable, finalized once.
"""
