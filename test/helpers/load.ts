// Continuous request load for rotation tests: keep-alive clients and a client that opens a new
// connection per request, counting every failure, until stopped.
import { EventEmitter } from 'node:events'
import tls from 'node:tls'
import { X509Certificate } from 'node:crypto'
import { Agent } from 'undici'
import { get, mtlsClient } from './mesh'
import type { Credentials, Tap } from './mesh'

export interface Load {
  /** Resolves once `count` more requests have completed. */
  more (count: number): Promise<void>
  /** Stops the loops and reports. */
  stop (): Promise<{ requests: number, failures: number, errors: string[] }>
}

export function startLoad (t: Tap, origin: string, creds: Credentials, path = '/'): Load {
  const keepAlive = mtlsClient(t, creds)
  const progress = new EventEmitter()
  const state = { running: true, requests: 0, failures: 0, errors: [] as string[] }
  const loop = async (fresh: boolean): Promise<void> => {
    while (state.running) {
      const dispatcher = fresh ? new Agent({ connect: { ...creds, checkServerIdentity: () => undefined }, pipelining: 0 }) : keepAlive
      try {
        const res = await get(dispatcher, `${origin}${path}`)
        if (res.status !== 200) {
          state.failures++
          state.errors.push(`status ${res.status}`)
        }
      } catch (err) {
        state.failures++
        state.errors.push((err as Error).message)
      } finally {
        state.requests++
        progress.emit('request')
        if (fresh) await dispatcher.close()
      }
    }
  }
  const loops = [loop(false), loop(false), loop(true)]
  return {
    more: async (count) => {
      const target = state.requests + count
      await new Promise<void>((resolve) => {
        const check = (): void => {
          if (state.requests < target) return
          progress.off('request', check)
          resolve()
        }
        progress.on('request', check)
      })
    },
    stop: async () => {
      state.running = false
      await Promise.all(loops)
      return { requests: state.requests, failures: state.failures, errors: state.errors }
    }
  }
}

/** The leaf a new TLS connection to `port` is served (chain not verified: this reads what is served). */
export async function servedLeaf (port: number, creds: { key: string, cert: string }): Promise<X509Certificate> {
  return await new Promise((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, ...creds, rejectUnauthorized: false }, () => {
      const cert = socket.getPeerX509Certificate() as X509Certificate
      socket.end()
      resolve(cert)
    })
    socket.on('error', reject)
  })
}
