// A TCP proxy in front of a server, to play a server restart: cut() drops every connection and
// stops listening (clients see the server go away), resume() listens again on the same port.
import net from 'node:net'
import type { Tap } from './mesh'

export interface TcpProxy {
  readonly address: string
  cut (): Promise<void>
  resume (): Promise<void>
}

export async function startTcpProxy (t: Tap, target: { host: string, port: number }): Promise<TcpProxy> {
  const sockets = new Set<net.Socket>()
  const server = net.createServer((client) => {
    const upstream = net.connect(target.port, target.host)
    sockets.add(client)
    sockets.add(upstream)
    client.pipe(upstream).pipe(client)
    const drop = (): void => {
      client.destroy()
      upstream.destroy()
      sockets.delete(client)
      sockets.delete(upstream)
    }
    client.on('error', drop).on('close', drop)
    upstream.on('error', drop).on('close', drop)
  })
  const listen = async (port: number): Promise<number> => await new Promise((resolve) => {
    server.listen(port, '127.0.0.1', () => resolve((server.address() as net.AddressInfo).port))
  })
  const port = await listen(0)
  const proxy: TcpProxy = {
    address: `127.0.0.1:${port}`,
    cut: async () => {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()))
      for (const socket of sockets) socket.destroy()
      sockets.clear()
      await closed
    },
    resume: async () => { await listen(port) }
  }
  t.teardown(async () => {
    for (const socket of sockets) socket.destroy()
    if (server.listening) await new Promise<void>((resolve) => server.close(() => resolve()))
  })
  return proxy
}
