/** iSCSI opcodes (RFC 7143 §11.2.1.2). Initiator opcodes 0x00-0x1f, target opcodes 0x20-0x3f. */
export const enum Opcode {
  NopOut = 0x00,
  ScsiCommand = 0x01,
  TaskManagementRequest = 0x02,
  LoginRequest = 0x03,
  TextRequest = 0x04,
  DataOut = 0x05,
  LogoutRequest = 0x06,
  Snack = 0x10,

  NopIn = 0x20,
  ScsiResponse = 0x21,
  TaskManagementResponse = 0x22,
  LoginResponse = 0x23,
  TextResponse = 0x24,
  DataIn = 0x25,
  LogoutResponse = 0x26,
  ReadyToTransfer = 0x31,
  AsyncMessage = 0x32,
  Reject = 0x3f,
}

/** Reject reasons (RFC 7143 §11.17.1). */
export const enum RejectReason {
  DataDigestError = 0x02,
  SnackReject = 0x03,
  ProtocolError = 0x04,
  CommandNotSupported = 0x05,
  ImmediateCommandReject = 0x06,
  TaskInProgress = 0x07,
  InvalidDataAck = 0x08,
  InvalidPduField = 0x09,
  LongOperationReject = 0x0a,
  WaitingForLogout = 0x0c,
}

/** Task management function responses (RFC 7143 §11.6.1). */
export const enum TaskManagementResponseCode {
  FunctionComplete = 0,
  TaskDoesNotExist = 1,
  LunDoesNotExist = 2,
  TaskStillAllegiant = 3,
  TaskAllegianceReassignmentNotSupported = 4,
  FunctionNotSupported = 5,
  FunctionAuthorizationFailed = 6,
  FunctionRejected = 255,
}

/** Logout reason codes (RFC 7143 §11.14.1) and responses (§11.15.1). */
export const enum LogoutReason {
  CloseSession = 0,
  CloseConnection = 1,
  RemoveConnectionForRecovery = 2,
}

export const enum LogoutResponseCode {
  Success = 0,
  CidNotFound = 1,
  RecoveryNotSupported = 2,
  CleanupFailed = 3,
}

/** Async event codes (RFC 7143 §11.9.1). */
export const enum AsyncEvent {
  ScsiAsyncEvent = 0,
  LogoutRequested = 1,
  ConnectionWillDrop = 2,
  SessionWillDrop = 3,
  NegotiationRequested = 4,
}

/** AHS types (RFC 7143 §11.2.2). */
export const enum AhsType {
  ExtendedCdb = 1,
  BidirectionalReadDataLength = 2,
}

/** The reserved tag value 0xffffffff (RFC 7143 §11.2.1.8). */
export const RESERVED_TAG = 0xffffffff;
export const BHS_LENGTH = 48;
