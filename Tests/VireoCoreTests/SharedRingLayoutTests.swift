import Testing
import VireoABI
import VireoCore
import VireoHypercalls

/// The ring's layout against the C ABI (which VireoABITests checks against Xen's headers).
@Suite struct SharedRingLayoutTests {
    @Test func headerOffsetsAreXens() {
        #expect(RingLayout.requestProducerOffset == MemoryLayout<vireo_blkif_sring>.offset(of: \.req_prod))
        #expect(RingLayout.requestEventOffset == MemoryLayout<vireo_blkif_sring>.offset(of: \.req_event))
        #expect(RingLayout.responseProducerOffset == MemoryLayout<vireo_blkif_sring>.offset(of: \.rsp_prod))
        #expect(RingLayout.responseEventOffset == MemoryLayout<vireo_blkif_sring>.offset(of: \.rsp_event))
        #expect(RingLayout.privateOffset == MemoryLayout<vireo_blkif_sring>.offset(of: \.pvt))
        #expect(RingLayout.paddingOffset == MemoryLayout<vireo_blkif_sring>.offset(of: \.__pad))
        #expect(RingLayout.headerSize == MemoryLayout<vireo_blkif_sring>.offset(of: \.ring))
        #expect(RingLayout.headerSize == MemoryLayout<vireo_netif_tx_sring>.offset(of: \.ring))
        #expect(RingLayout.headerSize == 64)
        #expect([0, 4, 8, 12] == [RingLayout.requestProducerOffset, RingLayout.requestEventOffset,
                                  RingLayout.responseProducerOffset, RingLayout.responseEventOffset])
    }

    /// Entry size is C's union size; the one-page slot counts are the ABI's constants.
    @Test func entrySizesAndOnePageRingSizesMatchTheABI() {
        #expect(RingLayout.entrySize(request: vireo_blkif_request.self, response: vireo_blkif_response.self)
                == MemoryLayout<vireo_blkif_sring_entry>.size)
        #expect(RingLayout.entrySize(request: vireo_netif_tx_request.self, response: vireo_netif_tx_response.self)
                == MemoryLayout<vireo_netif_tx_sring_entry>.size)
        #expect(RingLayout.entrySize(request: vireo_netif_rx_request.self, response: vireo_netif_rx_response.self)
                == MemoryLayout<vireo_netif_rx_sring_entry>.size)
        #expect(RingLayout.entrySize(request: vireo_xen_netif_ctrl_request.self, response: vireo_xen_netif_ctrl_response.self)
                == MemoryLayout<vireo_xen_netif_ctrl_sring_entry>.size)

        let blkif = RingLayout.slotCount(request: vireo_blkif_request.self, response: vireo_blkif_response.self, pages: 1)
        let tx = RingLayout.slotCount(request: vireo_netif_tx_request.self, response: vireo_netif_tx_response.self, pages: 1)
        let rx = RingLayout.slotCount(request: vireo_netif_rx_request.self, response: vireo_netif_rx_response.self, pages: 1)
        let ctrl = RingLayout.slotCount(
            request: vireo_xen_netif_ctrl_request.self, response: vireo_xen_netif_ctrl_response.self, pages: 1)
        #expect(blkif == 32 && blkif == Int(VIREO_ABI_BLKIF_RING_SIZE))
        #expect(tx == 256 && tx == Int(VIREO_ABI_NETIF_TX_RING_SIZE))
        #expect(rx == 256 && rx == Int(VIREO_ABI_NETIF_RX_RING_SIZE))
        #expect(ctrl == 128 && ctrl == Int(VIREO_ABI_NETIF_CTRL_RING_SIZE))
    }

    /// Xen's __RING_SIZE: the largest power of two <= (bytes - offsetof(ring)) / sizeof(ring[0]).
    @Test(arguments: [1, 2, 4, 8, 16])
    func multiPageRingSizesFollowXensFormula(pages: Int) {
        let bytes = pages * RingLayout.pageSize
        let entry = MemoryLayout<vireo_blkif_sring_entry>.size
        var expected = 1
        while expected * 2 <= (bytes - MemoryLayout<vireo_blkif_sring>.offset(of: \.ring)!) / entry { expected *= 2 }
        #expect(RingLayout.slotCount(request: vireo_blkif_request.self, response: vireo_blkif_response.self, pages: pages)
                == expected)
        #expect([1: 32, 2: 64, 4: 128, 8: 256, 16: 512][pages] == expected)
    }

    @Test func swiftEntryTypesGetCsUnionSize() throws {
        // {UInt64, UInt32}: size 12, alignment 8, so C's sizeof is 16.
        #expect(RingLayout.entrySize(request: Reply12.self, response: UInt8.self) == 16)
        #expect(RingLayout.entrySize(request: Message64.self, response: Reply12.self) == 64)
        #expect(RingLayout.entrySize(request: UInt16.self, response: (UInt8, UInt8, UInt8).self) == 4)
        #expect(RingLayout.slotCount(request: Message64.self, response: Reply12.self, pages: 1) == 32)
        #expect(RingLayout.slotCount(request: Message64.self, response: Reply12.self, pages: 4) == 128)
        #expect(RingLayout.slotCount(entrySize: 64, byteCount: 64) == 0)
        #expect(RingLayout.slotCount(entrySize: 0, byteCount: 4096) == 0)
        #expect(RingLayout.slotCount(entrySize: 1, byteCount: 65) == 1)
        #expect(RingLayout.slotCount(request: UInt8.self, response: UInt8.self, pages: 0) == 0)
    }

    @Test func aRegionWithoutRoomForOneSlotIsRefused() throws {
        let pages = try RingPages()
        #expect(throws: RingError.regionTooSmall(byteCount: 100, entrySize: 112)) {
            try BackRing<vireo_blkif_request, vireo_blkif_response>(attaching: pages.region.slice(offset: 0, count: 100))
        }
        let geometry = try RingGeometry(request: vireo_blkif_request.self, response: vireo_blkif_response.self, byteCount: 4096)
        #expect(geometry == (try BackRing<vireo_blkif_request, vireo_blkif_response>(attaching: pages.region).geometry))
        #expect(geometry.slots == 32 && geometry.entrySize == 112 && geometry.pages == 1)
    }

    @Test func frontInitialisesTheHeaderAndBackWritesNothing() throws {
        let pages = try RingPages()
        pages.region.fill(0xff, at: 0, count: 4096)
        let front = try FrontRing<vireo_blkif_request, vireo_blkif_response>(initializing: pages.region)
        #expect(pages.word(at: RingLayout.requestProducerOffset) == 0)
        #expect(pages.word(at: RingLayout.requestEventOffset) == 1)
        #expect(pages.word(at: RingLayout.responseProducerOffset) == 0)
        #expect(pages.word(at: RingLayout.responseEventOffset) == 1)
        #expect(pages.bytes(at: 16, count: 48) == [UInt8](repeating: 0, count: 48), "pvt and __pad zeroed")
        #expect(pages.bytes(at: 64, count: 32) == [UInt8](repeating: 0xff, count: 32), "slots untouched")
        #expect(front.size == 32 && front.freeRequests == 32)

        pages.region.fill(0x5a, at: 0, count: 4096)
        let back = try BackRing<vireo_blkif_request, vireo_blkif_response>(attaching: pages.region, at: 7)
        #expect(pages.bytes(at: 0, count: 4096) == [UInt8](repeating: 0x5a, count: 4096))
        #expect(back.requestsConsumed == 7 && back.responsesProduced == 7 && back.requestsInFlight == 0)
    }
}
