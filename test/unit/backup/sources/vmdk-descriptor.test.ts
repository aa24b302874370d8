import { describe, expect, it } from 'vitest';
import { parseVmdkDescriptor } from '../../../../src/backup/sources/vmdk-descriptor.js';
import { SourceError } from '../../../../src/backup/errors.js';

const FILE = '/images/disk.vmdk';

describe('parseVmdkDescriptor', () => {
  it('parses a monolithicFlat descriptor as qemu-img writes it', () => {
    const text = [
      '# Disk DescriptorFile',
      'version=1',
      'CID=6da0908b',
      'parentCID=ffffffff',
      'createType="monolithicFlat"',
      '',
      '# Extent description',
      'RW 16384 FLAT "disk-flat.vmdk" 0',
      '',
      '# The Disk Data Base',
      '#DDB',
      '',
      'ddb.virtualHWVersion = "4"',
      'ddb.geometry.cylinders = "16"',
      'ddb.adapterType = "ide"',
      '',
    ].join('\n');
    const descriptor = parseVmdkDescriptor(text, FILE);
    expect(descriptor.version).toBe(1);
    expect(descriptor.createType).toBe('monolithicFlat');
    expect(descriptor.parentCid).toBe('ffffffff');
    expect(descriptor.parentFileNameHint).toBeUndefined();
    expect(descriptor.extents).toEqual([{ access: 'RW', sectors: 16384, type: 'FLAT', fileName: 'disk-flat.vmdk', offsetSectors: 0 }]);
    expect(descriptor.keys.get('ddb.adapterType')).toBe('ide');
    expect(descriptor.keys.get('ddb.geometry.cylinders')).toBe('16');
  });

  it('parses several extents (CRLF line ends, offsets, ZERO, RDONLY, names with spaces)', () => {
    const text = [
      '# Disk DescriptorFile',
      'version=1',
      'encoding="UTF-8"',
      'CID=fffffffe',
      'parentCID=ffffffff',
      'createType="twoGbMaxExtentSparse"',
      'RW 4192256 SPARSE "My Disk-s001.vmdk"',
      'RDONLY 4192256 FLAT "My Disk-f002.vmdk" 2048',
      'RW 1024 ZERO',
      'NOACCESS 8 FLAT "x.bin"',
      '',
    ].join('\r\n');
    const descriptor = parseVmdkDescriptor(text, FILE);
    expect(descriptor.createType).toBe('twoGbMaxExtentSparse');
    expect(descriptor.extents.map((e) => [e.access, e.sectors, e.type, e.fileName, e.offsetSectors])).toEqual([
      ['RW', 4192256, 'SPARSE', 'My Disk-s001.vmdk', 0],
      ['RDONLY', 4192256, 'FLAT', 'My Disk-f002.vmdk', 2048],
      ['RW', 1024, 'ZERO', undefined, 0],
      ['NOACCESS', 8, 'FLAT', 'x.bin', 0],
    ]);
    expect(descriptor.keys.get('encoding')).toBe('UTF-8');
  });

  it('reads the parent of a delta disk', () => {
    const text = '# Disk DescriptorFile\nversion=1\nCID=2\nparentCID=1a2b3c4d\nparentFileNameHint="base.vmdk"\ncreateType="monolithicSparse"\nRW 2048 SPARSE "delta.vmdk"\n';
    const descriptor = parseVmdkDescriptor(text, FILE);
    expect(descriptor.parentCid).toBe('1a2b3c4d');
    expect(descriptor.parentFileNameHint).toBe('base.vmdk');
  });

  it('stops at the NUL padding of an embedded descriptor', () => {
    const text = '# Disk DescriptorFile\ncreateType="streamOptimized"\nRW 2048 SPARSE "s.vmdk"\n\0\0\0garbage that is not a line\n';
    expect(parseVmdkDescriptor(text, FILE).extents).toHaveLength(1);
  });

  const bad: Array<[string, string, RegExp]> = [
    ['no createType', '# Disk DescriptorFile\nRW 8 FLAT "a"\n', /no createType/],
    ['no extents', '# Disk DescriptorFile\ncreateType="monolithicFlat"\n', /lists no extents/],
    ['unknown extent type', '# Disk DescriptorFile\ncreateType="monolithicFlat"\nRW 8 WEIRD "a"\n', /unknown extent type "WEIRD"/],
    ['size not a number', '# Disk DescriptorFile\ncreateType="monolithicFlat"\nRW eight FLAT "a"\n', /malformed extent line/],
    ['FLAT without file', '# Disk DescriptorFile\ncreateType="monolithicFlat"\nRW 8 FLAT\n', /FLAT extent without a file name/],
    ['unterminated quote', '# Disk DescriptorFile\ncreateType="monolithicFlat"\nRW 8 FLAT "a 0\n', /malformed extent line/],
    ['a stray line', '# Disk DescriptorFile\ncreateType="monolithicFlat"\nhello world\nRW 8 FLAT "a"\n', /line 3 is not understood/],
    ['binary garbage', '\x01\x02\x03', /line 1 is not understood/],
    ['huge size', `# Disk DescriptorFile\ncreateType="monolithicFlat"\nRW ${'9'.repeat(30)} FLAT "a"\n`, /out of range/],
  ];
  for (const [name, text, pattern] of bad) {
    it(`rejects ${name} with a SourceError naming the file`, () => {
      let caught: unknown;
      try {
        parseVmdkDescriptor(text, FILE);
      } catch (err) {
        caught = err;
      }
      expect(caught).toBeInstanceOf(SourceError);
      expect((caught as SourceError).message).toMatch(pattern);
      expect((caught as SourceError).file).toBe(FILE);
    });
  }
});
