"""Writing an OVA: an OVF descriptor, streamOptimized disks and a manifest, in one tar."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tarfile

from ..errors import VmdkError

# ------------------------------------------------------------------------- export

_OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="vmdk-python" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vmw="http://www.vmware.com/schema/ovf"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="{disk_file}" ovf:id="file1" ovf:size="{disk_file_size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="{populated}"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="{os_id}">
      <Info>The kind of installed guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-{hw}</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>{cpus} virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>{memory}MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{memory}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def _xml_escape(text: str) -> str:
    # xml.sax.saxutils would do, but importing it pulls in urllib and http (30 ms)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(
        '"', "&quot;")


def build_ovf(name: str, disk_file: str, disk_file_size: int, capacity: int, populated: int, *,
              cpus: int = 1, memory_mb: int = 1024, hardware_version: int = 10,
              os_id: int = 101) -> bytes:
    """A minimal OVF 1.0 envelope for one VM with one streamOptimized disk."""
    return _OVF.format(name=_xml_escape(name), disk_file=_xml_escape(disk_file),
                       disk_file_size=disk_file_size, capacity=capacity, populated=populated,
                       cpus=cpus, memory=memory_mb, hw=hardware_version, os_id=os_id).encode()


def export_ova(src: str | os.PathLike[str], ova: str | os.PathLike[str], *,
               name: str | None = None, cpus: int = 1, memory_mb: int = 1024,
               compression_level: int = 1, progress: Callable[[int], None] | None = None,
               allow_external: bool = False, force_share: bool = False) -> None:
    """Package the disk ``src`` (raw or any VMDK) as an OVA: OVF, streamOptimized disk, manifest."""
    from ..convert import convert

    src, ova = os.fspath(src), os.fspath(ova)
    stem = name or os.path.splitext(os.path.basename(ova))[0]
    if not stem or any(c in stem for c in '/\\"') or not stem.isprintable():
        raise VmdkError(f"the VM name {stem!r} cannot name files (no slashes, quotes or control "
                        "characters)", ova)
    if cpus < 1 or memory_mb < 1:
        raise VmdkError(f"a VM needs at least one CPU and 1 MB of memory ({cpus} CPUs, "
                        f"{memory_mb} MB asked for)", ova)
    disk_name = f"{stem}-disk1.vmdk"
    from .._output import StagedOutput
    from ..image import io_errors

    # The package is made beside its name, its disk in the same staging folder; the name
    # appears only when the package is whole, and a failure leaves nothing.
    with io_errors(ova):
        stage = StagedOutput(ova, overwrite=True, image=False)
    with stage, io_errors(ova):
        tmp_disk = os.path.join(os.path.dirname(stage.path), disk_name)
        convert(src, tmp_disk, subformat="streamOptimized", adapter_type="lsilogic",
                compression_level=compression_level, progress=progress,
                allow_external=allow_external, force_share=force_share, durable=False)
        from ..image import Image

        with Image.open(tmp_disk) as image:
            capacity = image.size
            populated = sum(r.length for r in image.map() if r.data)
        disk_size = os.path.getsize(tmp_disk)
        ovf = build_ovf(stem, disk_name, disk_size, capacity, populated, cpus=cpus,
                        memory_mb=memory_mb)
        disk_digest = _sha256_file(tmp_disk)
        import hashlib  # OpenSSL is slow to load and only exports need it

        manifest = (f"SHA256({stem}.ovf)= {hashlib.sha256(ovf).hexdigest()}\n"
                    f"SHA256({disk_name})= {disk_digest}\n").encode()
        import tarfile
        with open(stage.path, "wb") as out:
            with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                # The OVF must come first: importers read the archive as a stream.
                _add_bytes(tar, f"{stem}.ovf", ovf)
                tar.add(tmp_disk, arcname=disk_name, filter=_plain_member)
                _add_bytes(tar, f"{stem}.mf", manifest)
            out.flush()
            os.fsync(out.fileno())
        stage.commit()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import tarfile

    info = _plain_member(tarfile.TarInfo(name))
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _plain_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Every member alike: written now, mode 644, no owner of this machine's."""
    info.mtime = int(time.time())
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _sha256_file(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["build_ovf", "export_ova"]
