// Loads connectca.proto (shipped next to the compiled code) once, for the plugin's client and
// the dev agent's server. Message shapes as @grpc/proto-loader delivers them (camelCase fields,
// 64-bit integers as strings).
import { join } from 'node:path'
import * as grpc from '@grpc/grpc-js'
import { loadSync } from '@grpc/proto-loader'

export const CONNECT_CA_SERVICE = 'hashicorp.consul.connectca.ConnectCAService'

export interface CARootMessage {
  id: string
  name: string
  serialNumber: string
  signingKeyId: string
  rootCert: string
  intermediateCerts: string[]
  active: boolean
  rotatedOutAt: { seconds: string, nanos: number } | null
}

export interface WatchRootsResponse {
  activeRootId: string
  trustDomain: string
  roots: CARootMessage[]
}

export interface SignRequest { csr: string }
export interface SignResponse { certPem: string }

export interface ConnectCAClient extends grpc.Client {
  WatchRoots (request: object, metadata: grpc.Metadata): grpc.ClientReadableStream<WatchRootsResponse>
  Sign (request: SignRequest, metadata: grpc.Metadata, options: grpc.CallOptions, callback: (err: grpc.ServiceError | null, response?: SignResponse) => void): grpc.ClientUnaryCall
}

export type ConnectCAClientConstructor = new (address: string, credentials: grpc.ChannelCredentials, options?: grpc.ChannelOptions) => ConnectCAClient

let loaded: grpc.ServiceClientConstructor | undefined

/** The generated client constructor; its `.service` is the definition a server implements. */
export function connectCA (): grpc.ServiceClientConstructor {
  loaded ??= (() => {
    const definition = loadSync(join(__dirname, 'connectca.proto'), { keepCase: false, longs: String, enums: String, defaults: true, oneofs: true })
    return grpc.loadPackageDefinition(definition).hashicorp as unknown as { consul: { connectca: { ConnectCAService: grpc.ServiceClientConstructor } } }
  })().consul.connectca.ConnectCAService
  return loaded
}
