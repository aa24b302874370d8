import { StorageError } from '../block-device.js';

/** A chunk is missing, unreadable, or its content does not match its digest. Never wrong data. */
export class CorruptChunkError extends StorageError {
  constructor(
    readonly digestHex: string,
    readonly reason: string,
    readonly path?: string,
  ) {
    super(`corrupt chunk ${digestHex}: ${reason}`, 'medium-error');
    this.name = 'CorruptChunkError';
  }
}

/** A disk image cannot be parsed or changed under us: names the file and the reason. */
export class SourceError extends Error {
  constructor(
    readonly file: string,
    reason: string,
  ) {
    super(`${file}: ${reason}`);
    this.name = 'SourceError';
  }
}

/** The repository is missing, malformed, locked or a restore point does not exist. */
export class RepositoryError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RepositoryError';
  }
}
