<#
.SYNOPSIS
  Build the Understudy Windows installer (CUDA or CPU variant) with PyInstaller + Inno Setup 6.

.DESCRIPTION
  Run from any folder on Windows 10/11 x64 (PowerShell 5.1 or 7):

    powershell -ExecutionPolicy Bypass -File installers\windows\build_windows.ps1 -Variant cuda
    powershell -ExecutionPolicy Bypass -File installers\windows\build_windows.ps1 -Variant cpu

  Steps: (1) a build venv per variant, .venv-win-<variant>, with torch 2.13.0 from the PyTorch
  index for the variant, the project (pinned by pyproject.toml) and PyInstaller 6.22.3;
  (2) the PyInstaller one-folder bundle in dist\windows\<variant>\understudy\ from the shared
  spec; (3) a headless check of the bundle: the engine CLI finds the built-in model and the
  app's --smoke-test --require-model exits 0; (4) Inno Setup compiles
  dist\windows\Understudy-<version>-win64-<variant>-setup.exe.

  Packages are downloaded only while building (step 1). The installer that comes out
  downloads nothing: the bundle, the built-in model and the icon are all inside it.

  Needs: Python 3.11 x64 (python.org installer, with the "py" launcher), Inno Setup 6.3 or
  newer (ISCC.exe), about 15 GB free disk for the CUDA variant. The CUDA build machine needs
  no GPU; the PCs that run the CUDA variant need an NVIDIA driver.

.PARAMETER Variant
  cuda (default) or cpu.
.PARAMETER Python
  A python.exe that already has everything installed; skips step 1.
.PARAMETER TorchIndex
  PyTorch wheel index for the variant (default: cu128 for cuda, cpu for cpu).
.PARAMETER Iscc
  Path to ISCC.exe (default: found in the usual Inno Setup 6 folders or on PATH).
.PARAMETER SkipSmokeTest
  Do not launch the bundle before packaging it.
#>
[CmdletBinding()]
param(
    [ValidateSet('cuda', 'cpu')][string]$Variant = 'cuda',
    [string]$Python = '',
    [string]$TorchIndex = '',
    [string]$Iscc = '',
    [switch]$SkipSmokeTest
)

$ErrorActionPreference = 'Stop'
$Root = (Resolve-Path (Join-Path $PSScriptRoot '..\..')).Path
Set-Location $Root
$TorchVersion = '2.13.0'
$PyInstallerVersion = '6.22.3'
$HooksContribVersion = '2026.9'

function Invoke-Checked([string]$Exe, [string[]]$Arguments) {
    & $Exe @Arguments
    if ($LASTEXITCODE -ne 0) { throw "failed ($LASTEXITCODE): $Exe $($Arguments -join ' ')" }
}

function Get-ProjectVersion {
    $line = Select-String -Path (Join-Path $Root 'pyproject.toml') -Pattern '^version\s*=\s*"(.+)"' |
        Select-Object -First 1
    if (-not $line) { throw 'no version in pyproject.toml' }
    return $line.Matches[0].Groups[1].Value
}

function New-BuildVenv {
    $venv = Join-Path $Root ".venv-win-$Variant"
    $py = Join-Path $venv 'Scripts\python.exe'
    if (-not (Test-Path $py)) { Invoke-Checked 'py' @('-3.11', '-m', 'venv', $venv) }
    $index = $TorchIndex
    if (-not $index) { $index = "https://download.pytorch.org/whl/$(if ($Variant -eq 'cuda') { 'cu128' } else { 'cpu' })" }
    Invoke-Checked $py @('-m', 'pip', 'install', '--upgrade', 'pip')
    Invoke-Checked $py @('-m', 'pip', 'install', "torch==$TorchVersion", '--index-url', $index)
    $pin = Join-Path $venv 'torch-pin.txt'
    & $py -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" | Set-Content -Encoding ascii $pin
    Invoke-Checked $py @('-m', 'pip', 'install', '-c', $pin, '-e', $Root,
        "pyinstaller==$PyInstallerVersion", "pyinstaller-hooks-contrib==$HooksContribVersion")
    return $py
}

function Build-Bundle([string]$Py) {
    $env:UNDERSTUDY_VARIANT = $Variant
    $dist = Join-Path $Root "dist\windows\$Variant"
    Invoke-Checked $Py @('-m', 'PyInstaller', '--noconfirm', '--distpath', $dist,
        '--workpath', (Join-Path $Root "build\pyinstaller-win-$Variant"),
        (Join-Path $Root 'installers\pyinstaller\understudy.spec'))
    return (Join-Path $dist 'understudy')
}

function Invoke-Bundle([string]$Exe, [string[]]$Arguments) {
    # understudy.exe is a GUI-subsystem program: wait for it explicitly to get its exit code.
    $p = Start-Process -FilePath $Exe -ArgumentList $Arguments -Wait -PassThru -NoNewWindow
    if ($p.ExitCode -ne 0) { throw "$Exe $($Arguments -join ' ') exited $($p.ExitCode)" }
}

function Test-Bundle([string]$Bundle) {
    $env:QT_QPA_PLATFORM = 'offscreen'
    $env:HF_HUB_OFFLINE = '1'
    $env:TRANSFORMERS_OFFLINE = '1'
    $exe = Join-Path $Bundle 'understudy.exe'
    Invoke-Bundle $exe @('--engine', 'inspect', '--json')
    Invoke-Bundle $exe @('--smoke-test', '--require-model')
    Remove-Item Env:QT_QPA_PLATFORM
}

function Find-Iscc {
    if ($Iscc) { return $Iscc }
    $candidates = @(
        (Join-Path ${env:ProgramFiles(x86)} 'Inno Setup 6\ISCC.exe'),
        (Join-Path $env:ProgramFiles 'Inno Setup 6\ISCC.exe'),
        (Join-Path $env:LOCALAPPDATA 'Programs\Inno Setup 6\ISCC.exe')
    )
    foreach ($c in $candidates) { if (Test-Path $c) { return $c } }
    $onPath = Get-Command 'ISCC.exe' -ErrorAction SilentlyContinue
    if ($onPath) { return $onPath.Source }
    throw 'ISCC.exe not found: install Inno Setup 6.3+ (https://jrsoftware.org/isdl.php) or pass -Iscc'
}

$version = Get-ProjectVersion
$py = if ($Python) { $Python } else { New-BuildVenv }
$bundle = Build-Bundle $py
if (-not $SkipSmokeTest) { Test-Bundle $bundle }
Invoke-Checked (Find-Iscc) @("/DVariant=$Variant", "/DAppVersion=$version",
    (Join-Path $Root 'installers\windows\understudy.iss'))
Write-Host "done: dist\windows\Understudy-$version-win64-$Variant-setup.exe"
