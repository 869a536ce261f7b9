// Shapes of the Consul agent HTTP API as they travel on the wire (PascalCase, Consul's own field
// names). Both the plugin (which parses them) and the dev agent (which produces them) use these
// types, so a field renamed on one side fails the type-check on the other.
// Reference: docs/semantics.md#agent-api; real answers of a Consul agent are in test/fixtures/consul/.

/** `GET /v1/agent/connect/ca/leaf/:service` (structs.IssuedCert). */
export interface IssuedCert {
  SerialNumber: string
  CertPEM: string
  PrivateKeyPEM: string
  Service: string
  ServiceURI: string
  ValidAfter: string
  ValidBefore: string
  Namespace?: string
  Partition?: string
  CreateIndex: number
  ModifyIndex: number
}

/** One entry of `Roots` in `GET /v1/agent/connect/ca/roots` (structs.CARoot). */
export interface CARoot {
  ID: string
  Name: string
  SerialNumber: number
  SigningKeyID: string
  ExternalTrustDomain: string
  NotBefore: string
  NotAfter: string
  RootCert: string
  IntermediateCerts: string[] | null
  Active: boolean
  PrivateKeyType: string
  PrivateKeyBits: number
  CreateIndex: number
  ModifyIndex: number
}

/** `GET /v1/agent/connect/ca/roots` (structs.IndexedCARoots). */
export interface IndexedCARoots {
  ActiveRootID: string
  TrustDomain: string
  Roots: CARoot[]
}

/** One header matcher of an L7 permission (structs.IntentionHTTPHeaderPermission). */
export interface IntentionHTTPHeaderPermission {
  Name: string
  Present?: boolean
  Exact?: string
  Prefix?: string
  Suffix?: string
  Contains?: string
  Regex?: string
  Invert?: boolean
  IgnoreCase?: boolean
}

/** The `HTTP` block of an L7 permission (structs.IntentionHTTPPermission). */
export interface IntentionHTTPPermission {
  PathExact?: string
  PathPrefix?: string
  PathRegex?: string
  Header?: IntentionHTTPHeaderPermission[]
  Methods?: string[]
}

export interface IntentionJWTRequirement {
  Providers?: Array<{ Name: string, VerifyClaims?: Array<{ Path?: string[], Value?: string }> }>
}

/** One L7 permission (structs.IntentionPermission). */
export interface IntentionPermission {
  Action: 'allow' | 'deny'
  HTTP?: IntentionHTTPPermission
  JWT?: IntentionJWTRequirement
}

/** One element of `GET /v1/connect/intentions/match` (structs.Intention, as marshalled). */
export interface Intention {
  ID?: string
  Description?: string
  SourceNS: string
  SourceName: string
  SourcePartition?: string
  SourcePeer?: string
  SourceSamenessGroup?: string
  SourceType: string
  DestinationNS: string
  DestinationName: string
  DestinationPartition?: string
  /** Absent when `Permissions` is non-empty. */
  Action?: 'allow' | 'deny'
  Permissions?: IntentionPermission[]
  JWT?: IntentionJWTRequirement
  Meta?: Record<string, string>
  Precedence: number
  CreateIndex: number
  ModifyIndex: number
}

/** `GET /v1/connect/intentions/match`: keyed by the `name` value exactly as sent; `null` means none. */
export type IntentionMatchResponse = Record<string, Intention[] | null>

/** `mesh` config entry, `HTTP.Incoming.RequestNormalization` (Consul 1.20.1+). */
export interface RequestNormalization {
  InsecureDisablePathNormalization?: boolean
  MergeSlashes?: boolean
  PathWithEscapedSlashesAction?: '' | 'IMPLEMENTATION_SPECIFIC_DEFAULT' | 'KEEP_UNCHANGED' | 'REJECT_REQUEST' | 'UNESCAPE_AND_REDIRECT' | 'UNESCAPE_AND_FORWARD'
  HeadersWithUnderscoresAction?: '' | 'ALLOW' | 'REJECT_REQUEST' | 'DROP_HEADER'
}

/** `POST /v1/agent/connect/authorize` response. */
export interface ConnectAuthorizeResponse {
  Authorized: boolean
  Reason: string
}
