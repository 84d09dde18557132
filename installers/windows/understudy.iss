; Understudy - Inno Setup 6 script: per-user install, Start-menu and desktop shortcuts,
; uninstaller. One script, two variants of the PyInstaller bundle:
;
;   iscc /DVariant=cuda installers\windows\understudy.iss   (NVIDIA GPU; needs the NVIDIA driver)
;   iscc /DVariant=cpu  installers\windows\understudy.iss   (runs on any x64 PC)
;
; Optional defines: /DAppVersion=0.1.0 (build_windows.ps1 passes pyproject's version),
; /DSpan (split into Setup-*.bin slices; Inno needs it only above 4.2 GB compressed).
; The bundle comes from installers\windows\build_windows.ps1:
; dist\windows\<variant>\understudy\. Nothing is downloaded when the installer runs.
; User data (chats, settings, added models in %LOCALAPPDATA%\Understudy) is kept on
; uninstall unless the user says yes to deleting it (default: no), or passes
; /DELETEUSERDATA=yes to a silent uninstall.

#ifndef Variant
  #define Variant "cpu"
#endif
#if Variant != "cpu" && Variant != "cuda"
  #error Variant must be cpu or cuda: iscc /DVariant=cpu or /DVariant=cuda
#endif
#ifndef AppVersion
  #define AppVersion "0.1.0"
#endif
#if Variant == "cuda"
  #define VariantLabel "NVIDIA CUDA"
#else
  #define VariantLabel "CPU"
#endif
#define AppName "Understudy"
#define AppExe "understudy.exe"
#define BundleDir "..\..\dist\windows\" + Variant + "\understudy"
#define UserDataDir "{localappdata}\Understudy"

[Setup]
AppId={{8E4C2B71-5A0D-4F3E-9B16-2C7D5E8A9F40}
AppName={#AppName}
AppVersion={#AppVersion}
AppVerName={#AppName} {#AppVersion} ({#VariantLabel})
AppPublisher=Understudy contributors
VersionInfoVersion={#AppVersion}
DefaultDirName={autopf}\{#AppName}
DefaultGroupName={#AppName}
DisableProgramGroupPage=yes
PrivilegesRequired=lowest
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
MinVersion=10.0
OutputDir=..\..\dist\windows
OutputBaseFilename=Understudy-{#AppVersion}-win64-{#Variant}-setup
SetupIconFile=..\..\resources\icons\understudy.ico
UninstallDisplayIcon={app}\{#AppExe}
UninstallDisplayName={#AppName} ({#VariantLabel})
Compression=lzma2/normal
SolidCompression=no
WizardStyle=modern
CloseApplications=yes
#ifdef Span
DiskSpanning=yes
DiskSliceSize=max
#endif

[Languages]
Name: "english"; MessagesFile: "compiler:Default.isl"

[Tasks]
Name: "desktopicon"; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"

[InstallDelete]
; An upgrade or a switch between the CPU and CUDA variants replaces the whole bundle.
Type: filesandordirs; Name: "{app}\_internal"

[Files]
Source: "{#BundleDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{autoprograms}\{#AppName}"; Filename: "{app}\{#AppExe}"; WorkingDir: "{app}"; Comment: "Offline chat with Mixture-of-Experts models"
Name: "{autodesktop}\{#AppName}"; Filename: "{app}\{#AppExe}"; WorkingDir: "{app}"; Tasks: desktopicon

[Run]
Filename: "{app}\{#AppExe}"; Description: "{cm:LaunchProgram,{#AppName}}"; Flags: nowait postinstall skipifsilent

[UninstallDelete]
; Python byte-code caches written next to the bundle at run time (never user data).
Type: filesandordirs; Name: "{app}\_internal\__pycache__"

[Code]
var
  DeleteUserData: Boolean;

function CudaDriverPresent(): Boolean;
begin
  Result := FileExists(ExpandConstant('{sys}\nvcuda.dll'));
end;

function InitializeSetup(): Boolean;
begin
  Result := True;
#if Variant == "cuda"
  if not CudaDriverPresent() then
    Result := SuppressibleMsgBox('No NVIDIA driver was found (nvcuda.dll is missing). ' +
      'The CUDA variant of Understudy needs an NVIDIA GPU with its driver installed; ' +
      'without one it runs on the CPU only, and the CPU variant is smaller.' + #13#10#13#10 +
      'Install the CUDA variant anyway?', mbConfirmation, MB_YESNO, IDYES) = IDYES;
#endif
end;

function AskDeleteUserData(): Boolean;
begin
  if UninstallSilent() then
    Result := CompareText(ExpandConstant('{param:DELETEUSERDATA|no}'), 'yes') = 0
  else
    Result := MsgBox('Also delete your Understudy chats, settings and added models?' + #13#10 +
      ExpandConstant('{#UserDataDir}') + #13#10#13#10 +
      'Choose No to keep them for a later install (recommended).',
      mbConfirmation, MB_YESNO or MB_DEFBUTTON2) = IDYES;
end;

procedure CurUninstallStepChanged(CurUninstallStep: TUninstallStep);
begin
  if CurUninstallStep = usUninstall then
    DeleteUserData := AskDeleteUserData();
  if (CurUninstallStep = usPostUninstall) and DeleteUserData then
    DelTree(ExpandConstant('{#UserDataDir}'), True, True, True);
end;
