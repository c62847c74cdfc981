"""Evaluation: metrics, reference predictors, `vis2ir evaluate` and `vis2ir ablate` (docs/evaluation.md).

- `metrics`: PSNR/SSIM under the ThermalGen protocol and natively; per-class heat errors.
- `networks`: FID (pytorch-fid's Inception) and LPIPS-alex without torchvision; the Fréchet distance.
- `scoring`: `Scorer`, every metric accumulated over (prediction, truth) pairs.
- `baselines`: reference predictors (class-mean oracle, visible-colour lookup, constant).
- `run`: evaluate folders, or a checkpoint on a data split; `report`, `plots`: the outputs.
- `ablate`: the grid runner, resumable and shardable over processes.
"""
